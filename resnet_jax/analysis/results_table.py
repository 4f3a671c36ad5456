"""Results tables: final test error of runs, mean +- std over seeds, beside the papers' numbers.

Each run's final test error is ``100 * (1 - eval/top1_acc)`` of the last eval row of its
``metrics.jsonl`` (the run's own ``dataset.eval_crops`` views), or, where ``python -m
resnet_jax.evaluate --eval_crops=10`` has written ``eval_<step>_10crop.json`` for that step, of
the 10-crop result: the papers' ImageNet protocol. The "test views" column says which (1 or 10).
Results of ``evaluate --eval_image_size=N`` (``eval_<step>[_10crop]_<N>px.json``, paper 2's 320
crops) are rows of their own, with N in a "test size" column; a paper's number stands beside the
rows of the protocol it was measured with.
Runs are grouped by their configuration minus the seed: the group key is the test views, the
dataset, the model name, the shortcut kind (the family's default when not set), and every other
config key whose value differs between the runs given, except keys that cannot change the result
(seed, logging, checkpointing, data location, scan/remat: see ``config.NON_RESULT_KEYS``). Those differing
keys are shown in a "setting" column. Each group shows the mean and the sample standard deviation
(ddof=1, as papers report "mean +- std" over a few runs) of its runs' errors, the number of seeds,
and the final iteration. Runs without an eval row are skipped with a warning.

The "paper" column is the published number for the same (dataset, model, shortcut; for gated
shortcuts also the gate's bias initialisation), where one exists (``PAPER``, ``GATED_PAPER``),
beside runs trained and tested as the papers' were: the whole network from a random
initialisation (not ``init_from`` or ``trainable='head'`` runs), on the test split (not
``dataset.validation_split``: such rows say "validation" in an "eval split" column), with the
paper's test views and size. Paper 1's CIFAR-10 Table 6 and ImageNet 10-crop top-1 (Tables 2-4),
paper 2's Table 1 shortcut variants of ResNet-110 and its pre-activation CIFAR table.

Runs set aside by ``--fresh`` (``WORKDIR/old-<time>/``, a run inside a run's directory) are not
counted; two runs of one seed in one row, and runs resumed with other settings
(``run_info.json``'s ``setting_changes``), are warned of.

Usage::

  python -m resnet_jax.analysis.results_table --root runs/ [--markdown results.md] [--latex results.tex]
  python -m resnet_jax.analysis.results_table --runs runs/resnet20_s0 runs/resnet20_s1 runs/resnet20_s2

The markdown table is printed in every case.

Library: ``collect(workdirs) -> rows``, ``to_markdown(rows)``, ``to_latex(rows)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import statistics
import sys
from collections.abc import Iterable, Sequence

from resnet_jax import cli
from resnet_jax.analysis import common
from resnet_jax.config import IMAGENET_IMAGE_SIZE, NON_RESULT_KEYS, flat_settings
from resnet_jax.errors import UserError, describe
from resnet_jax.logbook import METRICS_FILE, read_metrics
from resnet_jax.workdir import CONFIG_FILE, read_run_info, result_path

log = logging.getLogger("resnet_jax")


@dataclasses.dataclass(frozen=True)
class PaperNumber:
    """A published test error in %, with what it is (``note``), e.g. 'best of 5; mean 6.61'."""

    error: float
    note: str = ""
    test_size: int | None = None  # the crop side it was tested at, when not the training size
    views: int = 1  # the test views it was measured with (paper 1's ImageNet: 10-crop)

    def __str__(self) -> str:
        return f"{self.error:.2f}" + (f" ({self.note})" if self.note else "")


# (dataset, zoo model name, shortcut) -> the paper's test error in %, from the papers' tables (paper
# 1: Tables 2, 3 and 6; paper 2: Table 1 and its pre-activation CIFAR and ImageNet results).
PAPER: dict[tuple[str, str, str], PaperNumber] = {
    # Paper 1, Table 6 (CIFAR-10, option A).
    ("cifar10", "cifar_resnet20", "A"): PaperNumber(8.75),
    ("cifar10", "cifar_resnet32", "A"): PaperNumber(7.51),
    ("cifar10", "cifar_resnet44", "A"): PaperNumber(7.17),
    ("cifar10", "cifar_resnet56", "A"): PaperNumber(6.97),
    ("cifar10", "cifar_resnet110", "A"): PaperNumber(6.43, "best of 5; mean 6.61"),
    ("cifar10", "cifar_resnet1202", "A"): PaperNumber(7.93),
    # Paper 2, Table 1: ResNet-110 shortcut variants on CIFAR-10 (gates: GATED_PAPER).
    ("cifar10", "cifar_resnet110", "scaled"): PaperNumber(12.35),
    ("cifar10", "cifar_resnet110", "C"): PaperNumber(12.22),
    # Paper 2, full pre-activation.
    ("cifar10", "cifar_preact_resnet164", "B"): PaperNumber(5.46),
    ("cifar100", "cifar_preact_resnet164", "B"): PaperNumber(24.33),
    ("cifar10", "cifar_preact_resnet1001", "B"): PaperNumber(4.92, "mean 4.89"),
    ("cifar100", "cifar_preact_resnet1001", "B"): PaperNumber(22.71, "mean 22.68"),
    # Paper 2, the original (post-activation) bottleneck baselines of the same depths.
    ("cifar10", "cifar_bottleneck_resnet164", "B"): PaperNumber(5.93),
    ("cifar100", "cifar_bottleneck_resnet164", "B"): PaperNumber(25.16),
    ("cifar10", "cifar_bottleneck_resnet1001", "B"): PaperNumber(7.61),
    ("cifar100", "cifar_bottleneck_resnet1001", "B"): PaperNumber(27.82),
    # Paper 1, ImageNet validation top-1 error, 10-crop testing.
    ("imagenet2012", "plain18", "none"): PaperNumber(27.94, "10-crop", views=10),
    ("imagenet2012", "resnet18", "A"): PaperNumber(27.88, "10-crop", views=10),
    ("imagenet2012", "plain34", "none"): PaperNumber(28.54, "10-crop", views=10),
    ("imagenet2012", "resnet34", "A"): PaperNumber(25.03, "10-crop", views=10),
    ("imagenet2012", "resnet34", "B"): PaperNumber(24.52, "10-crop", views=10),
    ("imagenet2012", "resnet34", "C"): PaperNumber(24.19, "10-crop", views=10),
    ("imagenet2012", "resnet50", "B"): PaperNumber(22.85, "10-crop", views=10),
    ("imagenet2012", "resnet101", "B"): PaperNumber(21.75, "10-crop", views=10),
    ("imagenet2012", "resnet152", "B"): PaperNumber(21.43, "10-crop", views=10),
    # Paper 2, ImageNet, single 320x320 crop.
    ("imagenet2012", "preact_resnet200", "B"): PaperNumber(20.7, "320 crop", test_size=320),
    ("imagenet2012", "resnet200", "B"): PaperNumber(21.8, "320 crop", test_size=320),
}

# Paper 2, Table 1's gated ResNet-110s by the gate's bias initialisation b_g (gate_bias_init):
# (dataset, model, shortcut, b_g) -> error; other b_g have no published number beside them.
GATED_PAPER: dict[tuple[str, str, str, float], PaperNumber] = {
    ("cifar10", "cifar_resnet110", "gated", -6.0): PaperNumber(8.70, "b_g -6"),
    ("cifar10", "cifar_resnet110", "gated", -7.0): PaperNumber(9.81, "b_g -7"),
    ("cifar10", "cifar_resnet110", "shortcut_gated", -6.0): PaperNumber(6.91, "b_g -6"),
    ("cifar10", "cifar_resnet110", "shortcut_gated", 0.0): PaperNumber(12.86, "b_g 0"),
}


def paper_number(dataset: str, name: str, shortcut: str, model: dict) -> PaperNumber | None:
    """The published error for a run's (dataset, model, shortcut), and for gated shortcuts its
    gate bias initialisation, if there is one."""
    if shortcut in ("gated", "shortcut_gated"):
        bias = model.get("gate_bias_init", -6.0)
        return GATED_PAPER.get((dataset, name, shortcut, float(bias))) if _is_number(bias) else None
    return PAPER.get((dataset, name, shortcut))


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# Shown in their own columns.
_OWN_COLUMNS = frozenset({"model.name", "model.shortcut", "dataset.name"})
_DATASET_ORDER = {"digits": 0, "cifar10": 1, "cifar100": 2, "imagenet2012": 3, "synthetic": 4}


@dataclasses.dataclass
class Row:
    """One group of runs (the seeds of one configuration).

    Attributes:
      dataset: ``config.dataset.name``.
      model_name: the zoo name (``cifar_resnet20``).
      shortcut: the shortcut kind used.
      setting: the config keys that set this group apart from the others (``key=value, ...``).
      views: the test views of each error: 1, or 10 (10-crop testing).
      test_size: the crop side of the test, when not the training size (``evaluate
        --eval_image_size``, or the run's own ``dataset.eval_image_size``).
      split: 'test', or 'validation' (``dataset.validation_split``: held out of the training set).
      errors: each run's final test error, %.
      steps: each run's final eval step.
      workdirs: the runs.
      paper: the published number, if any.
    """

    dataset: str
    model_name: str
    shortcut: str
    setting: str
    views: int
    test_size: int | None
    split: str
    errors: list[float]
    steps: list[int]
    workdirs: list[str]
    paper: PaperNumber | None

    @property
    def model(self) -> str:
        return common.pretty_model_name(self.model_name)

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def std(self) -> float:
        """The sample standard deviation (ddof=1); NaN for a single run."""
        return statistics.stdev(self.errors) if self.n > 1 else math.nan

    def error_text(self, pm: str = "±") -> str:
        return f"{self.mean:.2f}" if self.n == 1 else f"{self.mean:.2f} {pm} {self.std:.2f}"

    def steps_text(self) -> str:
        lo, hi = min(self.steps), max(self.steps)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"


def final_test_error(workdir: str | pathlib.Path, eval_crops: int = 1) -> tuple[int, float, int] | None:
    """``(step, error in %, test views)`` of a run's final evaluation, or None without one.

    The last eval row of ``metrics.jsonl`` (made with the run's ``eval_crops``) or, when the run
    evaluated that step with 1 view and ``evaluate --eval_crops=10`` wrote its 10-crop result,
    that result instead.

    Raises:
      UserError: the 10-crop result file is not readable JSON with ``eval/top1_acc``.
    """
    evals = [r for r in read_metrics(workdir) if "eval/top1_acc" in r]
    if not evals:
        return None
    last = max(evals, key=lambda r: r["step"])  # (read_metrics keeps only rows with an integer step)
    if not _is_number(last["eval/top1_acc"]):
        raise UserError(
            f"{pathlib.Path(workdir) / METRICS_FILE}: the last eval row (step {last['step']!r}) has "
            f"eval/top1_acc={last['eval/top1_acc']!r}, not a number; fix or move the run away"
        )
    step, acc, views = int(last["step"]), float(last["eval/top1_acc"]), int(eval_crops)
    ten = result_path(workdir, step, 10)
    if views == 1 and ten.is_file():
        try:
            acc, views = float(json.loads(ten.read_text())["eval/top1_acc"]), 10
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"{ten} is not an evaluate result ({describe(e)}); fix or move it away") from None
    return step, 100.0 * (1.0 - acc), views


_SET_ASIDE = re.compile(r"old-\d{8}-\d{6}(-\d+)?")  # workdir.Workdir.set_aside's folders
_SIZED = re.compile(r"eval_(\d+)(_10crop)?_(\d+)px\.json")


def other_size_results(workdir: str | pathlib.Path, step: int) -> list[tuple[int, float, int, int]]:
    """``(step, error in %, test views, test size)`` for each ``evaluate --eval_image_size`` result
    of ``step`` (``eval_<step>[_10crop]_<N>px.json``), smallest size first.

    Raises:
      UserError: a result file is not readable JSON with ``eval/top1_acc``.
    """
    out = []
    for path in sorted(pathlib.Path(workdir).glob(f"eval_{step}_*px.json")):
        m = _SIZED.fullmatch(path.name)
        if not m or int(m.group(1)) != step:
            continue
        try:
            acc = float(json.loads(path.read_text())["eval/top1_acc"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"{path} is not an evaluate result ({describe(e)}); fix or move it away") from None
        out.append((step, 100.0 * (1.0 - acc), 10 if m.group(2) else 1, int(m.group(3))))
    return sorted(out, key=lambda r: (r[3], r[2]))


def _settings(cfg: dict, info: dict) -> dict[str, str]:
    """The run's settings for grouping, with where its step 0 came from as one key ``init_from``:
    its run_info.json's (``info``) record (source, checkpoint step, new or loaded head) rather than
    the config's ``init_from`` keys, which name a path that may have moved and a 'latest' that
    moves on."""
    flat = {k: v for k, v in flat_settings(cfg).items() if not k.startswith("init_from.")}
    record = info.get("init_from")
    start = None
    if isinstance(record, dict):
        step = f"@{record['step']}" if record.get("step") is not None else ""
        start = f"{record.get('path')}{step}" + (", new head" if record.get("head") == "new" else "")
    flat["init_from"] = json.dumps(start)
    return flat


def find_workdirs(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Every run directory under ``root`` (``root`` included): the folders holding a ``config.json``."""
    root = pathlib.Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--root {root} is not a directory; give the folder that holds the run directories")
    if not root.is_dir():
        raise UserError(f"--root {root} does not exist")
    found = {p.parent for p in root.rglob(CONFIG_FILE)}

    def set_aside(d: pathlib.Path) -> bool:
        # Inside another run's directory, or in an old-<time>/ folder: what --fresh set aside.
        parts = d.relative_to(root).parts
        inside = [root.joinpath(*parts[:i]) for i in range(len(parts))]  # root and below, not d
        return any(_SET_ASIDE.fullmatch(p) for p in parts) or any(a in found for a in inside)

    return sorted(d for d in found if not set_aside(d))


def _sort_key(row: Row) -> tuple:
    family = row.model_name.rstrip("0123456789")
    return (
        _DATASET_ORDER.get(row.dataset, 9),
        row.dataset,
        family,
        common.model_depth(row.model_name) or 0,
        row.shortcut,
        row.setting,
        row.test_size or 0,
        row.views,
        row.split,
    )


def collect(workdirs: Iterable[str | pathlib.Path]) -> list[Row]:
    """Groups runs by configuration (minus seed) and gathers their final test errors.

    Args:
      workdirs: training run directories (each with ``config.json`` and ``metrics.jsonl``).

    Returns:
      One ``Row`` per group, sorted by dataset, family, depth, shortcut and setting. Runs without
      an eval row are left out (with a logged warning).

    Raises:
      UserError: a directory that is not a run (no ``config.json``).
    """
    runs = []
    for wd in workdirs:
        cfg = common.read_config(wd)
        final = final_test_error(wd, int(cfg.get("dataset", {}).get("eval_crops", 1)))
        if final is None:
            log.warning("skipping %s: no eval row in its %s", wd, METRICS_FILE)
            continue
        info = read_run_info(wd)
        total = info.get("total_steps")
        if isinstance(total, int) and final[0] < total:
            log.warning(
                "%s is unfinished: its last eval is at step %d of %d (shown in 'iterations')", wd, final[0], total
            )
        changes = info.get("setting_changes")
        if changes:
            log.warning(
                "%s was resumed with other settings (run_info.json setting_changes: %s): it is grouped by its "
                "newest config.json",
                wd,
                json.dumps(changes),
            )
        flat = _settings(cfg, info)
        dataset_cfg = cfg.get("dataset", {})
        own = dataset_cfg.get("eval_image_size")
        own = own if own not in (None, dataset_cfg.get("image_size") or IMAGENET_IMAGE_SIZE) else None
        runs.append((str(wd), cfg, flat, (*final, own)))
        runs += [(str(wd), cfg, flat, r) for r in other_size_results(wd, final[0])]
    keys = sorted({k for _, _, flat, _ in runs for k in flat})
    varying = [
        k
        for k in keys
        if k not in NON_RESULT_KEYS
        and k not in _OWN_COLUMNS
        and len({flat.get(k, "<unset>") for _, _, flat, _ in runs}) > 1
    ]
    groups: dict[tuple, Row] = {}
    seeds: dict[tuple, dict] = {}
    for wd, cfg, flat, (step, error, views, size) in runs:
        dataset = str(cfg.get("dataset", {}).get("name", "?"))
        name = str(cfg.get("model", {}).get("name", "?"))
        shortcut = common.resolved_shortcut(cfg)
        split = "validation" if cfg.get("dataset", {}).get("validation_split") else "test"
        setting = ", ".join(f"{k}={json.loads(flat[k]) if k in flat else 'unset'}" for k in varying)
        key = (dataset, name, shortcut, setting, views, size, split)
        if key not in groups:
            paper = paper_number(dataset, name, shortcut, cfg.get("model", {}))
            # Beside the results of the protocol it was measured with only (test split, views,
            # paper 2's 320 crops), and of networks trained as the papers' were: whole, from a
            # random initialisation.
            from_scratch = json.loads(flat["init_from"]) is None and cfg.get("trainable", "all") == "all"
            protocol = paper is not None and (paper.test_size, paper.views, "test") == (size, views, split)
            groups[key] = Row(
                dataset,
                name,
                shortcut,
                setting,
                views,
                size,
                split,
                [],
                [],
                [],
                paper if protocol and from_scratch else None,
            )
        seed = cfg.get("seed")
        if seed in seeds.setdefault(key, {}) and seeds[key][seed] != wd:
            log.warning(
                "%s and %s both ran seed %s of one setting: the row counts it twice", seeds[key][seed], wd, seed
            )
        seeds[key].setdefault(seed, wd)
        groups[key].errors.append(error)
        groups[key].steps.append(step)
        groups[key].workdirs.append(wd)
    return sorted(groups.values(), key=_sort_key)


_HEADER = (
    "dataset", "model", "shortcut", "setting", "seeds", "iterations", "test views", "test size", "eval split",
    "test error (%)", "paper (%)",
)  # fmt: skip
_NUMERIC = ("seeds", "iterations", "test views", "test size", "test error (%)", "paper (%)")


def _cells(row: Row, pm: str) -> list[str]:
    paper = str(row.paper) if row.paper else "–"
    return [
        row.dataset, row.model, row.shortcut, row.setting, str(row.n), row.steps_text(), str(row.views),
        str(row.test_size) if row.test_size else "as trained", row.split, row.error_text(pm), paper,
    ]  # fmt: skip


def _columns(rows: Sequence[Row]) -> list[int]:
    # The setting column only when some group has one; the views where they matter (ImageNet,
    # whose published errors are 10-crop, or any 10-view result).
    shown = {
        "setting": any(r.setting for r in rows),
        "test views": any(r.views != 1 or r.dataset == "imagenet2012" for r in rows),
        "test size": any(r.test_size for r in rows),
        # validation_split runs: the error is on the 5k images held out of the training set.
        "eval split": any(r.split != "test" for r in rows),
    }
    return [i for i, h in enumerate(_HEADER) if shown.get(h, True)]


def to_markdown(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table (test error: mean ± sample std over seeds)."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(_HEADER[i] for i in cols) + " |"]
    lines.append(
        "|"
        + "|".join("---:" if _HEADER[i] in ("seeds", "iterations", "test views", "test size") else "---" for i in cols)
        + "|"
    )
    for r in rows:
        cells = _cells(r, "±")
        lines.append("| " + " | ".join(cells[i].replace("|", "\\|") for i in cols) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in text)


def to_latex(rows: Sequence[Row]) -> str:
    """The rows as a LaTeX ``tabular`` (no packages needed beyond LaTeX itself)."""
    cols = _columns(rows)
    align = "".join("r" if _HEADER[i] in _NUMERIC else "l" for i in cols)
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\hline"]
    lines.append(" & ".join(_latex_escape(_HEADER[i]) for i in cols) + r" \\")
    lines.append("\\hline")
    for r in rows:
        cells = [_latex_escape(c) for c in _cells(r, "PLUSMINUS")]
        cells = [c.replace("PLUSMINUS", "$\\pm$").replace("–", "--") for c in cells]
        lines.append(" & ".join(cells[i] for i in cols) + r" \\")
    lines += ["\\hline", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m resnet_jax.analysis.results_table", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR", help="training run directories")
    p.add_argument("--root", default=None, help="use every run directory below this folder")
    p.add_argument("--markdown", default=None, help="write the markdown table to this .md file")
    p.add_argument("--latex", default=None, help="write the LaTeX tabular to this .tex file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _run(args) -> int:
    if not args.runs and not args.root:
        raise UserError("give --runs DIR... or --root DIR")
    for r in args.runs:
        common.require_workdir(r)
    common.check_distinct_runs(args.runs)
    workdirs = [pathlib.Path(r) for r in args.runs]
    if args.root:
        found = find_workdirs(args.root)
        if not found:
            raise UserError(f"no run directory (with a {CONFIG_FILE}) under {args.root}")
        seen = {w.resolve() for w in workdirs}
        workdirs += [w for w in found if w.resolve() not in seen]
    md_out = common.check_output(args.markdown, args.overwrite, (".md",)) if args.markdown else None
    tex_out = common.check_output(args.latex, args.overwrite, (".tex",)) if args.latex else None
    rows = collect(workdirs)
    if not rows:
        raise UserError(f"none of the {len(workdirs)} runs has an eval row in its {METRICS_FILE}")
    md = to_markdown(rows)
    print(md, end="")
    if md_out is not None:
        md_out.write_text(md)
        print(f"wrote {md_out}", file=sys.stderr)  # stdout stays the table alone
    if tex_out is not None:
        tex_out.write_text(to_latex(rows))
        print(f"wrote {tex_out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 after a one-line ``error: ...``)."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    return common.run_main(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
