"""metrics.jsonl and the TensorBoard scalars: which lines are rows, what a resume keeps, and what
the logbook remembers of the evals it wrote."""

from __future__ import annotations

import logging

from cli_env import tensorboard_events, write_metrics

from resnet_jax.logbook import Logbook, read_metrics


def test_a_line_without_an_integer_step_is_no_row_and_a_resume_survives_it(tmp_path, caplog):
    """A JSON object without a step, or with a step that is no integer (a foreign or hand-edited
    line), is skipped with a warning naming its line, and a resume drops it with the later rows
    (before: a Logbook opened on a "2" step stopped with a TypeError traceback)."""
    rows = [{"step": 1, "train/loss": 2.0}, {"train/loss": 1.0}, {"step": "2"}, {"step": True}]
    write_metrics(tmp_path, [*rows, {"step": 2, "train/loss": 0.5}])
    with caplog.at_level(logging.WARNING, logger="resnet_jax"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    skipped = [r.getMessage() for r in caplog.records if "is not a metrics row" in r.getMessage()]
    assert [m.split(" is not")[0].rsplit(":", 1)[1] for m in skipped] == ["2", "3", "4"]
    book = Logbook(tmp_path, start_step=1)  # a resume from step 1: drops step 2 and the stray lines
    book.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_eval_written_is_a_logged_eval(tmp_path):
    """logged_eval answers for the rows this Logbook wrote, not only for those it read."""
    book = Logbook(tmp_path)
    book.write(4, {"train/loss": 1.0})
    book.write(4, {"eval/loss": 0.5, "eval/top1_acc": 0.75})
    assert book.logged_eval(4) == {"eval/loss": 0.5, "eval/top1_acc": 0.75}
    assert book.logged_eval(3) is None
    book.close()


def test_every_metric_is_a_tensorboard_scalar_at_its_step(tmp_path):
    book = Logbook(tmp_path)
    book.write(1, {"train/loss": 2.5})
    book.write(2, {"train/loss": 1.5, "eval/top1_acc": 0.25})
    book.close()
    scalars = [(v.tag, e.step, v.simple_value) for e in tensorboard_events(tmp_path) for v in e.summary.value]
    assert sorted(scalars) == [("eval/top1_acc", 2, 0.25), ("train/loss", 1, 2.5), ("train/loss", 2, 1.5)]
