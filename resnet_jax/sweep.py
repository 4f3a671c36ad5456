"""Run a list of experiments over seeds, one after another, or write a SLURM array script.

  python -m resnet_jax.sweep experiments/sweep_cifar10.py --seeds 3 [--root runs/cifar10]
      [--slurm out.sbatch] [--dry_run] [-- extra train flags, e.g. --config.num_steps=100]

A sweep file defines ``get_sweep()`` returning a list of ``{"name", "config", "overrides"}``
(``overrides``: optional, ``{config key: value}`` such as ``{"model.shortcut": "B"}``, passed as
``--config.key=value``). Each (run, seed) trains in ``ROOT/<name>/seed<k>`` with
``--config.seed=k``. A run whose workdir already holds its final evaluation and its final checkpoint
is skipped, so a sweep can be started again after an interruption (unfinished runs resume from their
checkpoints). A run directory that holds a run of other settings (the sweep file or its flags
changed since) is refused before any run starts, so that no result is silently reused or
overwritten. A run refused for bad input (exit status 2: e.g. a dataset that is not prepared) stops
the sweep; other failures are counted and the sweep goes on. Ctrl-C or SIGTERM stops the sweep after
the running run has saved a checkpoint (it is passed on to the run as SIGTERM).

The SLURM script runs each command from the directory the sweep was written in, with the Python
that wrote it (a virtual environment on a shared filesystem), so it can be submitted from anywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import reprlib
import runpy
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from resnet_jax import cli
from resnet_jax.errors import UserError, describe
from resnet_jax.logbook import read_metrics

_RUN_FORMAT = "each run is a dict {'name': str, 'config': str, 'overrides': {key: value}} (overrides optional)"


def _check_run(path: str, i: int, r: Any) -> None:
    if not isinstance(r, Mapping):
        raise UserError(f"{path}: run {i} of get_sweep() is {reprlib.repr(r)}, not a dict; {_RUN_FORMAT}")
    if not {"name", "config"} <= set(r):
        raise UserError(f"{path}: every run needs 'name' and 'config', got {reprlib.repr(dict(r))}")
    name, config = r["name"], r["config"]
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise UserError(f"{path}: run {i} has name {name!r}; a name is a non-empty string without '/' (a directory)")
    if not isinstance(config, str) or not config:
        raise UserError(f"{path}: run {name!r} has config {config!r}; give a config file, e.g. 'experiments/digits.py'")
    overrides = r.get("overrides", {})
    if not isinstance(overrides, Mapping):
        raise UserError(
            f"{path}: run {name!r} has overrides of type {type(overrides).__name__}; "
            "give a dict of config keys to values, e.g. {'num_steps': 100}"
        )
    bad = [k for k in overrides if not isinstance(k, str) or not k]
    if bad:
        raise UserError(f"{path}: run {name!r} has override keys {bad}; keys are config paths such as 'model.name'")
    if "seed" in overrides:
        raise UserError(f"{path}: run {name!r} overrides 'seed'; the sweep gives each run its seeds (--seeds)")
    for k, v in overrides.items():
        if isinstance(v, Mapping):
            raise UserError(
                f"{path}: run {name!r} has a dict for override {k!r}; give dotted keys, e.g. {{'{k}.name': ...}}"
            )
        if v is None:
            raise UserError(f"{path}: run {name!r} sets {k!r} to None; leave the key out to keep the config's value")


def load_sweep(path: str) -> list[dict]:
    p = pathlib.Path(path)
    if p.is_dir():
        raise UserError(f"sweep file {path} is a directory; pass a .py file that defines get_sweep()")
    if not p.is_file():
        raise UserError(f"sweep file {path} not found")
    try:
        namespace = runpy.run_path(str(p))
    except SyntaxError as e:
        raise UserError(f"cannot load sweep file {path}: {e.msg} (line {e.lineno}); fix the file") from None
    except Exception as e:  # noqa: BLE001 - a sweep file's top level can fail with anything (imports, I/O)
        raise UserError(f"cannot load sweep file {path}: {describe(e)}; fix the file") from None
    if "get_sweep" not in namespace:
        raise UserError(f"{path} defines no get_sweep()")
    if not callable(namespace["get_sweep"]):
        raise UserError(f"{path}: get_sweep is a {type(namespace['get_sweep']).__name__}, not a function")
    try:
        runs = namespace["get_sweep"]()
    except Exception as e:  # noqa: BLE001 - the user's code
        raise UserError(f"{path}: get_sweep() failed: {describe(e)}") from None
    if not isinstance(runs, list | tuple):
        raise UserError(f"{path}: get_sweep() returned {reprlib.repr(runs)}, not a list of runs; {_RUN_FORMAT}")
    if not runs:
        raise UserError(f"{path} defines no runs: get_sweep() returned an empty list")
    for i, r in enumerate(runs):
        _check_run(path, i, r)
    runs = [dict(r) for r in runs]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: run names must be unique")
    return runs


def check_overrides(runs: list[dict], extra: list[str]) -> dict[str, dict]:
    """Loads every run's config with its overrides (and ``extra``) and checks it as the trainer
    does (``cli.parse_config_flags``, ``cli.check_config``), without JAX: an unknown key, a value
    of the wrong type or a bad model name stops the sweep at once instead of failing every run.

    Returns:
      ``{run name: its config as the trainer writes it to config.json}`` (seed 0)."""
    configs = {}
    for r in runs:
        try:
            config = cli.experiment_config(r["config"], "--config.seed=0", *_override_flags(r), *extra)
        except UserError as e:
            raise UserError(f"run {r['name']!r} (--config={r['config']}): {e}") from None
        configs[r["name"]] = json.loads(json.dumps(config.to_dict()))
    return configs


def check_same_settings(workdir: pathlib.Path, expected: dict) -> None:
    """Refuses a run directory whose config.json differs from ``expected`` in a key that changes
    what the run computes (``config.NON_RESULT_KEYS`` aside; the seed counts) or that the trainer
    refuses to change on resume (``model.scan_blocks``: the checkpoints' parameters are stacked or
    not)."""
    from resnet_jax.config import NON_RESULT_KEYS, flat_settings
    from resnet_jax.workdir import refused_on_resume

    path = workdir / "config.json"
    if not path.is_file():
        return
    try:
        old = flat_settings(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is not readable JSON ({describe(e)}); fix the file or move it away") from None
    new = flat_settings(expected)
    keys = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and (k == "seed" or k not in NON_RESULT_KEYS or refused_on_resume(k))
    )
    if keys:
        changes = ", ".join(f"{k}: {old.get(k, 'unset')} -> {new.get(k, 'unset')}" for k in keys[:4])
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        raise UserError(
            f"{workdir} holds a run of other settings ({changes}{more}): the sweep changed since it ran; "
            "move that directory away or choose another --root (nothing was started)"
        )


def _override_flags(r: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in r.get("overrides", {}).items()]


def expand(runs: list[dict], seeds: int, root: str, extra: list[str]) -> list[tuple[pathlib.Path, list[str]]]:
    """(workdir, train command) for every run and seed."""
    jobs = []
    for r in runs:
        for seed in range(seeds):
            wd = pathlib.Path(root) / r["name"] / f"seed{seed}"
            cmd = [
                sys.executable,
                "-m",
                "resnet_jax.train",
                f"--config={r['config']}",
                f"--workdir={wd}",
                f"--config.seed={seed}",
            ]
            cmd += _override_flags(r)
            jobs.append((wd, cmd + list(extra)))
    return jobs


def finished(workdir: pathlib.Path) -> bool:
    """True when the run logged an evaluation at its last step and its final checkpoint exists."""
    info_path = workdir / "run_info.json"
    if not info_path.exists():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{info_path} is not readable JSON ({describe(e)}); fix the file or move it away") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path} holds a {type(info).__name__}, not a run's info; fix the file or move it away")
    total = info.get("total_steps")
    try:
        rows = read_metrics(workdir)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the metrics of {workdir} ({describe(e)}); fix or move away metrics.jsonl"
        ) from None
    # The final checkpoint too: an interrupted last save leaves only its temporary directory.
    final_checkpoint = (workdir / "checkpoints" / str(total)).is_dir()
    return final_checkpoint and any("eval/top1_acc" in r and r["step"] == total for r in rows)


def run_job(cmd: list[str]) -> tuple[int, int | None]:
    """Runs ``cmd``; a SIGINT or SIGTERM to the sweep meanwhile is passed on to it as SIGTERM (the
    trainer saves a checkpoint and exits). Returns (its exit status, the signal received or None)."""
    received: list[int] = []
    proc = subprocess.Popen(cmd)

    def handle(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return rc, (received[0] if received else None)


def slurm_script(jobs: list[tuple[pathlib.Path, list[str]]], log_dir: pathlib.Path) -> str:
    """A SLURM array script: task i runs job i (one node, one GPU, one process), from this
    directory (the commands' config and workdir paths are relative to it) with this Python."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=resnet_jax_sweep",
        f"#SBATCH --array=0-{len(jobs) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --signal=TERM@120  # preemption: SIGTERM two minutes before the end -> checkpoint",
        "#SBATCH --requeue",
        f"#SBATCH --output={log_dir.absolute()}/%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        "CMDS=(",
    ]
    lines += ["  " + shlex.quote(shlex.join(cmd)) for _, cmd in jobs]
    # srun: --signal goes to the job's steps, not to the batch shell (or what it starts itself).
    lines += [")", 'eval "srun ${CMDS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m resnet_jax.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep file with get_sweep()")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--root", default=None, help="runs go to ROOT/<name>/seed<k> (default runs/<sweep file name>)")
    parser.add_argument("--slurm", default=None, help="write a SLURM array script here instead of running")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]

    @cli.guarded
    def run() -> int:
        if args.seeds < 1:
            raise UserError("--seeds must be >= 1")
        bad = [e for e in extra if not e.startswith("--config.")]
        if bad:
            raise UserError(f"unknown arguments {bad}; extra flags must look like --config.key=value")
        seeded = [e for e in extra if e.split("=", 1)[0] == "--config.seed"]
        if seeded:  # it would come after --config.seed=k and give every seed directory one seed
            raise UserError(f"{seeded[0]}: the sweep sets each run's seed (--seeds N: seeds 0 to N-1)")
        runs = load_sweep(args.sweep)
        root = pathlib.Path(args.root or pathlib.Path("runs") / pathlib.Path(args.sweep).stem)
        cli.check_output_dir(root, "--root")
        out = pathlib.Path(args.slurm) if args.slurm else None
        if out is not None:  # every output path is checked before anything is created
            if out.exists():
                raise UserError(f"{out} exists; choose another --slurm path")
            cli.check_output_dir(out.parent, f"--slurm {out}: directory")
        if out is not None and any(c.isspace() for c in str(root.absolute())):
            raise UserError(f"--root {root}: #SBATCH lines cannot quote a path with spaces; choose another --root")
        configs = check_overrides(runs, extra)
        jobs = expand(runs, args.seeds, str(root), extra)
        for (wd, _), (name, seed) in zip(jobs, ((r["name"], k) for r in runs for k in range(args.seeds)), strict=True):
            check_same_settings(wd, {**configs[name], "seed": seed})
        if out is not None:
            log_dir = root / "slurm_logs"
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(slurm_script(jobs, log_dir))
            except OSError as e:
                raise UserError(f"cannot write --slurm {out} or {log_dir}: {describe(e)}") from None
            print(f"wrote {out} ({len(jobs)} array tasks): sbatch {out}")
            return 0
        cli.check_environment()  # every run inherits it: one message, not one failed run after another
        done = [finished(wd) for wd, _ in jobs]  # every run_info.json is read before a run starts
        failed = 0
        for i, (wd, cmd) in enumerate(jobs):
            tag = f"[{i + 1}/{len(jobs)}] {wd}"
            if done[i]:
                print(f"{tag}: finished, skipped", flush=True)
                continue
            print(f"{tag}: {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            rc, signum = run_job(cmd)
            if signum is not None:
                print(
                    f"stopped by {signal.Signals(signum).name} during {tag} (exit status {rc}); start the sweep "
                    "again to resume it (finished runs are skipped)",
                    file=sys.stderr,
                )
                return 128 + signum
            if rc == cli.EXIT_USAGE:
                raise UserError(f"{tag} was refused (its error is above): fix it and start the sweep again")
            if rc:
                failed += 1
                print(f"{tag}: failed with exit status {rc}", flush=True)
        if failed:
            raise UserError(f"{failed} of {len(jobs)} runs failed; start the sweep again to retry them")
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
