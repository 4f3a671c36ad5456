"""The main job on the embedded default: the degradation problem, reproduced on digits.

  python -m resnet_jax.demo --workdir=DIR

Trains cifar_plain20, cifar_plain56, cifar_resnet20 and cifar_resnet56 (or the CIFAR-style nets
of ``--models``) with one budget (experiments/degradation_digits.py) and writes
DIR/degradation.png (training error, plain vs residual, in the style of paper 1, Fig. 6),
DIR/results.md and DIR/results.json
(``{"cifar_plain20": {"steps": ..., "train_top1_err": ..., "test_top1_err": ...}, ...}``, errors as
fractions, ``steps`` the step of the test error: a table says how long its runs trained).
The training error of a run is the mean training-batch error over its last epoch (train mode, as
the paper's curves). Finished runs are not trained again when the demo is started again; a run
already past the steps asked for (an earlier, longer demo in the same --workdir) is refused, not
reported as if it were the shorter run.
"""

from __future__ import annotations

import json
import pathlib
import runpy
import time

from absl import flags

from resnet_jax import cli
from resnet_jax.errors import UserError
from resnet_jax.logbook import read_metrics

MODELS = ("cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56")
CONFIG = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "degradation_digits.py"

flags.DEFINE_string("workdir", "runs/demo", "output directory (one sub-directory per run)")
flags.DEFINE_integer("num_steps", None, "steps per run, for a quick look (default: the experiment's budget)")
flags.DEFINE_list(
    "models",
    list(MODELS),
    "the networks to train, plain and residual (e.g. cifar_plain110,cifar_resnet110 for deeper curves)",
)


def check_num_steps(num_steps: int | None) -> None:
    """``num_steps`` is None (the experiment's budget) or a positive number of steps."""
    if num_steps is not None and num_steps < 1:
        raise UserError(
            f"--num_steps={num_steps}: give a positive number of steps, or leave it out for the full budget"
        )


def demo_config(name: str, num_steps: int | None = None):
    """The shared budget (or ``num_steps`` steps), for model ``name``."""
    check_num_steps(num_steps)
    if not CONFIG.exists():
        raise UserError(f"{CONFIG} is missing: run the demo from a checkout of resnet_jax")
    config = runpy.run_path(str(CONFIG))["get_config"]()
    config.model.name = name
    if num_steps is not None:
        config.num_steps = num_steps
    return config


def summarize(workdir: pathlib.Path, steps_per_epoch: int) -> dict[str, float]:
    """Final training error (last epoch's mean) and test error of one run, as fractions, and the
    step of that test error."""
    rows = read_metrics(workdir)
    train = [r for r in rows if "train/top1_acc" in r]
    last = train[-1]["step"]
    recent = [r["train/top1_acc"] for r in train if r["step"] > last - steps_per_epoch] or [train[-1]["train/top1_acc"]]
    ev = [r for r in rows if "eval/top1_acc" in r][-1]
    return {
        "steps": ev["step"],
        "train_top1_err": 1.0 - sum(recent) / len(recent),
        "test_top1_err": 1.0 - ev["eval/top1_acc"],
    }


def plot(out_dir: pathlib.Path, runs: dict[str, pathlib.Path]) -> pathlib.Path:
    """Training error against iterations, plain (left) and residual (right), as in Fig. 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {"20": "tab:orange", "56": "tab:red"}
    for name, wd in runs.items():
        rows = [r for r in read_metrics(wd) if "train/top1_acc" in r]
        ax = axes[0] if "plain" in name else axes[1]
        depth = name.rstrip("0123456789")
        depth = name[len(depth) :]
        ax.plot(
            [r["step"] for r in rows],
            [100 * (1 - r["train/top1_acc"]) for r in rows],
            color=colors.get(depth),
            label=f"{depth}-layer",
        )
    for ax, title in zip(axes, ("plain", "ResNet")):
        ax.set(title=f"{title} (digits)", xlabel="iterations", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("training error (%)")
    fig.tight_layout()
    path = out_dir / "degradation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tables(out_dir: pathlib.Path, results: dict[str, dict[str, float]]) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| model | steps | train error (%) | test error (%) |", "|---|---|---|---|"]
    lines += [
        f"| {m} | {r['steps']} | {100 * r['train_top1_err']:.2f} | {100 * r['test_top1_err']:.2f} |"
        for m, r in results.items()
    ]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def check_models(models) -> tuple[str, ...]:
    """The demo's networks: CIFAR-style plain or residual nets (the digits are 8x8 images upscaled
    to CIFAR's 32x32), each named once. Raises UserError before anything is trained."""
    from resnet_jax.models import parse_name

    if not models:
        raise UserError(f"--models is empty; e.g. --models={','.join(MODELS)}")
    for name in models:
        try:
            fam, _, _ = parse_name(name)
        except ValueError as e:
            raise UserError(f"--models: {e}") from None
        if fam not in ("cifar_plain", "cifar_resnet"):
            raise UserError(
                f"--models: {name} is not a CIFAR plain or residual net (cifar_plain{{6n+2}}, cifar_resnet{{6n+2}})"
            )
    if len(set(models)) != len(models):
        raise UserError(f"--models names a network twice: {','.join(models)}")
    return tuple(models)


def latest_step(workdir: pathlib.Path) -> int | None:
    """The newest finalised checkpoint step of a run (what training resumes from), or None."""
    from resnet_jax.checkpointing import finalised_steps

    return max(finalised_steps(workdir), default=None)


def check_not_past(workdir: pathlib.Path, total_steps: int, num_steps: int | None) -> None:
    """Refuses a run that is already past ``total_steps``: training would only resume it (the
    trainer warns and trains nothing) and the tables would show the longer run as the one asked for."""
    step = latest_step(workdir)
    if step is not None and step > total_steps:
        asked = f"--num_steps={num_steps}" if num_steps is not None else "the experiment's budget"
        raise UserError(
            f"{workdir} holds a run trained to step {step}, past the {total_steps} steps asked for ({asked}); "
            f"use another --workdir (or remove {workdir})"
        )


def run_demo(out_dir: str, num_steps: int | None = None, models=MODELS) -> dict[str, dict[str, float]]:
    """Trains ``models`` (skipping finished runs) and writes the figure and tables; ``num_steps``
    (None: the experiment's budget) must be positive. Raises UserError, before anything is
    trained, if a run in ``out_dir`` is already past the steps asked for."""
    models = check_models(models)
    check_num_steps(num_steps)
    from resnet_jax.data import get_info
    from resnet_jax.schedules import Durations
    from resnet_jax.train import train_and_evaluate

    out = pathlib.Path(out_dir)
    plan = []
    for name in models:
        config = demo_config(name, num_steps)
        durations = Durations.from_config(config, get_info(config.dataset).num_train)
        check_not_past(out / name, durations.total_steps, num_steps)
        plan.append((name, config, durations.steps_per_epoch))
    runs, results = {}, {}
    for name, config, spe in plan:
        wd = out / name
        start = time.perf_counter()
        train_and_evaluate(config, str(wd))
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
        runs[name], results[name] = wd, summarize(wd, spe)
    plot(out, runs)
    write_tables(out, results)
    print((out / "results.md").read_text())
    return results


@cli.guarded
def _main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; the demo takes flags only (see --help)")
    cli.check_environment()
    cli.setup_logging()
    run_demo(flags.FLAGS.workdir, flags.FLAGS.num_steps, flags.FLAGS.models)


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
