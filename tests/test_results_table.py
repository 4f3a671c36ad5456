"""The results table's protocol rules: which runs count as seeds, and which rows get a paper's
number (gate bias, validation split, test views and size); bad run files are one-line errors."""

from __future__ import annotations

import json
import logging

import pytest

from resnet_jax.analysis import results_table
from resnet_jax.config import get_base_config


def fake_run(path, model="cifar_resnet110", acc=0.9, seed=0, dataset="cifar10", **settings):
    """A run directory as the trainer leaves it: config.json (``settings``: dotted keys) and one
    final eval row at step 400."""
    cfg = get_base_config()
    cfg.model.name, cfg.dataset.name, cfg.seed = model, dataset, seed
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 400, "eval/loss": 0.5, "eval/top1_acc": acc}) + "\n")
    return path


def rows_of(root):
    return results_table.collect(results_table.find_workdirs(root))


def test_a_run_set_aside_by_fresh_is_no_seed_and_a_seed_twice_is_warned_of(tmp_path, caplog):
    root = tmp_path / "runs"
    fake_run(root / "seed0", acc=0.90)
    fake_run(root / "seed0" / "old-20261204-101010", acc=0.50)  # what --fresh moved aside
    fake_run(root / "seed1", acc=0.92, seed=1)
    (row,) = rows_of(root)
    assert row.n == 2 and row.errors == pytest.approx([10.0, 8.0])
    fake_run(tmp_path / "other" / "seed0", acc=0.91)  # another sweep root's seed 0 of the same settings
    with caplog.at_level(logging.WARNING, logger="resnet_jax"):
        (row,) = results_table.collect([*results_table.find_workdirs(root), tmp_path / "other" / "seed0"])
    assert row.n == 3 and any("both ran seed 0 of one setting" in r.getMessage() for r in caplog.records)
    # A --fresh start that failed before its config.json: the set-aside folder alone is no run.
    (root / "seed0" / "config.json").unlink()
    assert rows_of(root)[0].n == 1  # seed1


@pytest.mark.parametrize(
    "shortcut, bias, paper",
    [("gated", -6.0, 8.70), ("gated", -7.0, 9.81), ("gated", 0.0, None), ("shortcut_gated", -6.0, 6.91),
     ("shortcut_gated", 0.0, 12.86), ("shortcut_gated", -3.0, None)],
)  # fmt: skip
def test_gated_shortcuts_get_the_paper_number_of_their_gate_bias(tmp_path, shortcut, bias, paper):
    """Paper 2 Table 1 reports each gate bias initialisation b_g on its own."""
    fake_run(tmp_path / "r", **{"model.shortcut": shortcut, "model.gate_bias_init": bias})
    (row,) = rows_of(tmp_path)
    assert (row.paper.error if row.paper else None) == paper


def test_validation_error_is_labelled_and_has_no_paper_number(tmp_path):
    fake_run(tmp_path / "val", model="cifar_resnet20", **{"dataset.validation_split": True})
    fake_run(tmp_path / "test", model="cifar_resnet20", seed=1)
    rows = {r.split: r for r in rows_of(tmp_path)}
    assert rows["validation"].paper is None and rows["test"].paper.error == 8.75
    md = results_table.to_markdown(list(rows.values()))
    assert "| eval split |" in md.splitlines()[0] and "| validation |" in md


def test_imagenet_paper_numbers_stand_beside_their_own_views_and_sizes(tmp_path):
    """Paper 1's ImageNet errors are 10-crop: not beside a centre-crop row. Paper 2's 320 crops:
    beside a run whose own eval is at 320 (dataset.eval_image_size), a row with that test size."""
    fake_run(tmp_path / "r50", model="resnet50", dataset="imagenet2012", acc=0.76, **{"model.stride_in": "1x1"})
    (row,) = rows_of(tmp_path)
    assert row.views == 1 and row.paper is None
    (tmp_path / "r50" / "eval_400_10crop.json").write_text(json.dumps({"eval/top1_acc": 0.77}))
    (row,) = rows_of(tmp_path)
    assert row.views == 10 and row.paper.error == 22.85
    fake_run(tmp_path / "pre200", model="preact_resnet200", dataset="imagenet2012", **{"dataset.eval_image_size": 320})
    row = next(r for r in rows_of(tmp_path) if r.model_name == "preact_resnet200")
    assert row.test_size == 320 and row.paper.error == 20.7


def test_a_run_resumed_with_other_settings_is_warned_of(tmp_path, caplog):
    fake_run(tmp_path / "r")
    (tmp_path / "r" / "run_info.json").write_text(
        json.dumps({"setting_changes": [{"step": 8, "learning_rate": [0.1, 0.4]}]})
    )
    with caplog.at_level(logging.WARNING, logger="resnet_jax"):
        rows_of(tmp_path)
    assert any("was resumed with other settings" in r.getMessage() and "0.4" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["config_list", "model_string", "acc_null", "acc_text"])
def test_bad_run_files_are_one_line(tmp_path, capsys, case):
    wd = fake_run(tmp_path / "r")
    if case == "config_list":
        (wd / "config.json").write_text("[1, 2]")
    elif case == "model_string":
        (wd / "config.json").write_text(json.dumps({"model": "resnet50", "dataset": {}}))
    else:
        acc = None if case == "acc_null" else "high"
        (wd / "metrics.jsonl").write_text(json.dumps({"step": 400, "eval/top1_acc": acc}) + "\n")
    assert results_table.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    needle = "is not a run's config" if case.startswith(("config", "model")) else "eval/top1_acc="
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_a_metrics_line_that_is_no_utf8_or_has_no_integer_step_is_skipped(tmp_path, caplog):
    """Such lines are no rows (as a torn last line): the final eval is the last real row's, and
    each skipped line is warned of."""
    wd = fake_run(tmp_path / "r", acc=0.9)
    with (wd / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 500, "eval/top1_acc": 0.1\xff\xfe}\n')
        f.write(b'{"step": "600", "eval/top1_acc": 0.2}\n')
    with caplog.at_level(logging.WARNING, logger="resnet_jax"):
        (row,) = rows_of(tmp_path)
    assert row.errors == pytest.approx([10.0])
    assert sum("is not a metrics row" in r.getMessage() for r in caplog.records) == 2
