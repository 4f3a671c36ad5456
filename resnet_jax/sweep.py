"""Run a list of experiments over seeds, one after another, or write a SLURM array script.

  python -m resnet_jax.sweep experiments/sweep_cifar10.py --seeds 3 [--root runs/cifar10]
      [--slurm out.sbatch] [--dry_run] [-- extra train flags, e.g. --config.num_steps=100]

A sweep file defines ``get_sweep()`` returning a list of ``{"name", "config", "overrides"}``
(``overrides``: a dict of ``--config.key=value`` pairs, optional). Each (run, seed) trains in
``ROOT/<name>/seed<k>`` with ``--config.seed=k``. A run whose workdir already holds its final
evaluation is skipped, so a sweep can be started again after an interruption (unfinished runs
resume from their checkpoints).
"""

from __future__ import annotations

import json
import pathlib
import runpy
import shlex
import subprocess
import sys

from resnet_jax import cli
from resnet_jax.errors import UserError
from resnet_jax.logbook import read_metrics


def load_sweep(path: str) -> list[dict]:
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"sweep file {path} not found")
    try:
        runs = runpy.run_path(str(p))["get_sweep"]()
    except KeyError:
        raise UserError(f"{path} defines no get_sweep()") from None
    for r in runs:
        if not {"name", "config"} <= set(r):
            raise UserError(f"{path}: every run needs 'name' and 'config', got {r}")
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: run names must be unique")
    return runs


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
            cmd += [f"--config.{k}={v}" for k, v in r.get("overrides", {}).items()]
            jobs.append((wd, cmd + list(extra)))
    return jobs


def finished(workdir: pathlib.Path) -> bool:
    """True when the run logged an evaluation at its last step."""
    info = workdir / "run_info.json"
    if not info.exists():
        return False
    total = json.loads(info.read_text()).get("total_steps")
    return any("eval/top1_acc" in r and r["step"] == total for r in read_metrics(workdir))


def slurm_script(jobs: list[tuple[pathlib.Path, list[str]]], log_dir: pathlib.Path) -> str:
    """A SLURM array script: task i runs job i (one node, all its GPUs, one process per node)."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=resnet_jax_sweep",
        f"#SBATCH --array=0-{len(jobs) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1",
        f"#SBATCH --output={log_dir}/%A_%a.out",
        "set -euo pipefail",
        "CMDS=(",
    ]
    lines += ["  " + shlex.quote(shlex.join(["python", *cmd[1:]])) for _, cmd in jobs]
    lines += [")", 'eval "${CMDS[$SLURM_ARRAY_TASK_ID]}"', ""]
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
        runs = load_sweep(args.sweep)
        root = args.root or str(pathlib.Path("runs") / pathlib.Path(args.sweep).stem)
        jobs = expand(runs, args.seeds, root, extra)
        if args.slurm:
            out = pathlib.Path(args.slurm)
            if out.exists():
                raise UserError(f"{out} exists; choose another --slurm path")
            (pathlib.Path(root) / "slurm_logs").mkdir(parents=True, exist_ok=True)
            out.write_text(slurm_script(jobs, pathlib.Path(root) / "slurm_logs"))
            print(f"wrote {out} ({len(jobs)} array tasks): sbatch {out}")
            return 0
        failed = 0
        for i, (wd, cmd) in enumerate(jobs):
            tag = f"[{i + 1}/{len(jobs)}] {wd}"
            if finished(wd):
                print(f"{tag}: finished, skipped", flush=True)
                continue
            print(f"{tag}: {shlex.join(cmd[1:])}", flush=True)
            if args.dry_run:
                continue
            rc = subprocess.call(cmd)
            if rc:
                failed += 1
                print(f"{tag}: failed with exit status {rc}", flush=True)
        if failed:
            raise UserError(f"{failed} of {len(jobs)} runs failed; start the sweep again to retry them")
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
