"""Metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per line, each with "step"), TensorBoard
event files (tensorboardX) and a PNG of the curves. Written by process 0 only."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys

from resnet_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir) -> list[dict]:
    """The rows of ``metrics.jsonl``. A line that does not parse (a crash or power loss in the
    middle of a write) is skipped with a warning."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    # (errors="replace": a line with bytes that are no UTF-8 fails to parse below, and is skipped.)
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and type(row.get("step")) is int:  # (a bool or "2" is no step)
            rows.append(row)
        else:
            logging.getLogger("resnet_jax").warning(
                "%s:%d is not a metrics row (an interrupted write?); skipped", path, i
            )
    return rows


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Replaces ``path`` with ``text`` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk, or a directory where the file goes)
        raise


def _summary_writer():
    """tensorboardX's ``SummaryWriter`` (imported lazily: library users do not need it).

    tensorboardX imports torch at import time when torch is installed, only to accept torch
    tensors: 4-5 s of every training process's start-up on a 2-core CPU. We log floats, so torch
    is hidden while tensorboardX imports, unless the process has already imported it.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class Logbook:
    """Appends metric rows. On resume at ``start_step`` the rows of later steps (written by the
    interrupted run, and about to be recomputed identically) are dropped first, from
    ``metrics.jsonl`` and, through a purge marker, from TensorBoard's view of the event files."""

    def __init__(self, workdir, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._tb = None
        self._evals: dict[int, dict] = {}
        if not enabled:
            return
        try:
            rows = [r for r in read_metrics(workdir) if r["step"] <= start_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        except OSError as e:
            raise UserError(
                f"cannot write {self.path} ({e.strerror}); move it away or choose another --workdir"
            ) from None
        self._evals = {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}
        # purge_step: TensorBoard drops the earlier files' events from this step on (SessionLog
        # START), which a crash between checkpoints left behind.
        self._tb = _summary_writer()(str(workdir), purge_step=start_step + 1)

    def logged_eval(self, step: int) -> dict[str, float] | None:
        """The eval metrics already in ``metrics.jsonl`` for ``step`` (process 0; None elsewhere)."""
        row = self._evals.get(step)
        return {k: v for k, v in row.items() if k.startswith("eval/")} if row else None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # (a full disk): one line; the checkpoints so far are intact
            raise UserError(
                f"cannot append to {self.path} at step {step} ({e.strerror}); free space and start again"
            ) from None
        if any(k.startswith("eval/") for k in row):
            self._evals[row["step"]] = row
        for k, v in metrics.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_curves(workdir, out: str | None = None) -> pathlib.Path:
    """Training and eval curves of one run (loss and top-1 error, in %) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [r for r in rows if "train/loss" in r]
    ev = [r for r in rows if "eval/loss" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train")
    a1.plot([r["step"] for r in ev], [r["eval/loss"] for r in ev], "o-", label="eval")
    a1.set(xlabel="step", ylabel="loss", title="loss")
    a2.plot([r["step"] for r in train], [100 * (1 - r["train/top1_acc"]) for r in train], label="train")
    a2.plot([r["step"] for r in ev], [100 * (1 - r["eval/top1_acc"]) for r in ev], "o-", label="eval")
    a2.set(xlabel="step", ylabel="top-1 error (%)", title="error")
    for a in (a1, a2):
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(out or pathlib.Path(workdir) / "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
