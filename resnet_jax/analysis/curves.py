"""Training curves like paper 1, Fig. 6: error against iterations, plain and residual networks.

Thin lines are training error (``1 - train/top1_acc``, averaged over each logging window of the
run's ``metrics.jsonl``), bold lines test error (``1 - eval/top1_acc``), both in %. Plain networks
get the left panel and residual networks the right one, as in the paper; a single kind gets one
panel. Each run has its own colour within its panel, the same for its thin and its bold line.

Usage::

  python -m resnet_jax.analysis.curves --runs runs/plain20 runs/plain56 runs/resnet20 runs/resnet56 \
      --out fig6.png [--labels plain-20 plain-56 ResNet-20 ResNet-56] [--ymax 20] [--overwrite]

Library: ``plot_error_curves({label: workdir}, out)``. Never imports JAX.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

from resnet_jax import cli
from resnet_jax.analysis import common
from resnet_jax.errors import UserError
from resnet_jax.logbook import METRICS_FILE, read_metrics


def error_curves(workdir: str | pathlib.Path) -> dict[str, tuple[list[int], list[float]]]:
    """A run's training and test error curves (in %) from its ``metrics.jsonl``.

    Returns:
      ``{"train": (steps, errors), "test": (steps, errors)}``; a curve may be empty.

    Raises:
      UserError: the run has no metric rows at all.
    """
    rows = read_metrics(workdir)
    curves = {}
    for kind, key in (("train", "train/top1_acc"), ("test", "eval/top1_acc")):
        have = sorted((r["step"], r[key]) for r in rows if key in r)
        curves[kind] = ([s for s, _ in have], [100.0 * (1.0 - a) for _, a in have])
    if not curves["train"][0] and not curves["test"][0]:
        raise UserError(f"no training or eval rows in {pathlib.Path(workdir) / METRICS_FILE}")
    return curves


def plot_error_curves(
    runs: Mapping[str, str | pathlib.Path],
    out: str | pathlib.Path,
    *,
    ymax: float | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Plots the error curves of several runs (paper 1, Fig. 6 style) to a PNG.

    Args:
      runs: legend label -> the run's workdir (with ``config.json`` and ``metrics.jsonl``).
      out: the PNG to write (replaced if it exists).
      ymax: the top of the error axis in % (default: fit the curves).
      title: an optional figure title.

    Returns:
      The path written.

    Raises:
      UserError: a run directory without its config or without metrics.
    """
    if not runs:
        raise UserError("no runs to plot")
    data = {label: (common.is_plain(common.read_config(wd)), error_curves(wd)) for label, wd in runs.items()}
    panels = [
        (name, [label for label, (plain, _) in data.items() if plain == want])
        for name, want in (("plain networks", True), ("residual networks", False))
    ]
    panels = [(name, labels) for name, labels in panels if labels]
    out = pathlib.Path(out)
    with common.pyplot() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), sharey=True, squeeze=False)
        top = 0.0
        for ax, (name, labels) in zip(axes[0], panels):
            for i, label in enumerate(labels):
                curves = data[label][1]
                color = f"C{i % 10}"
                (s, e), (ts, te) = curves["train"], curves["test"]
                ax.plot(s, e, color=color, linewidth=0.8, alpha=0.8)
                ax.plot(ts, te, color=color, linewidth=2.2, label=label)
                top = max([top, *e, *te])
            # Grey proxies explain the two line weights once per panel.
            ax.plot([], [], color="0.4", linewidth=0.8, label="(thin: training error)")
            ax.plot([], [], color="0.4", linewidth=2.2, label="(bold: test error)")
            ax.set(xlabel="iterations", title=name)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
            ax.legend(loc="upper right")
        axes[0][0].set_ylabel("error (%)")
        axes[0][0].set_ylim(0, ymax if ymax is not None else min(100.0, top * 1.05) or 1.0)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
    return out


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m resnet_jax.analysis.curves", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="training run directories")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: the model names)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--ymax", type=float, default=None, help="top of the error axis in %% (default: fit)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _run(args) -> int:
    for r in args.runs:
        common.require_workdir(r)
    common.check_distinct_runs(args.runs)
    labels = common.labels_for(args.runs, args.labels)
    common.check_distinct(labels)
    out = common.check_output(args.out, args.overwrite)
    plot_error_curves(dict(zip(labels, args.runs)), out, ymax=args.ymax, title=args.title)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 after a one-line ``error: ...``)."""
    args = _parser().parse_args(argv)
    return common.run_main(lambda: _run(args))


if __name__ == "__main__":
    import sys

    sys.exit(main())
