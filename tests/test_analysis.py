"""The analysis tools: layer responses, gradient flow, error curves and results tables.

Tiny networks (width 4 on 8x8 inputs) keep the JAX tests to a few compilations; curves and tables
run on fake run directories with hand-written ``config.json`` and ``metrics.jsonl``. One real
3-step digits run (module fixture) checks the checkpoint path end to end.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_env import assert_one_line_error, tree, user_env, write_metrics
from flax import nnx

from resnet_jax.analysis import curves, gradient_flow, layer_responses, results_table
from resnet_jax.config import get_base_config
from resnet_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(name: str, **options):
    return create_model(name, num_classes=10, rngs=nnx.Rngs(0), width=4, **options)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(12, 8, 8, 3)).astype(np.float32)


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- layer responses ----------------------------------------------------------------------------


def test_layer_responses_one_positive_value_per_conv_layer(images):
    """One finite, positive std per conv layer (the stem and 2 per block: 7 for a CIFAR 8-layer
    net), plain nets included; the model's mode is untouched; in train mode BN (scale 1, bias 0)
    makes each response std ~1."""
    model = tiny("cifar_resnet8", zero_init_last_bn=False)
    values = layer_responses.layer_responses(model, images)
    assert values.shape == (7,) and values.dtype == np.float64
    assert np.all(np.isfinite(values)) and np.all(values > 0)
    # Chunking pools the moments exactly.
    np.testing.assert_allclose(layer_responses.layer_responses(model, images, batch_size=6), values, rtol=1e-5)
    train = layer_responses.layer_responses(model, images, train=True, batch_size=len(images))
    np.testing.assert_allclose(train, 1.0, atol=1e-3)
    assert model.bn1.use_running_average is False  # still in the train mode create_model returns
    plain = layer_responses.layer_responses(tiny("cifar_plain8", zero_init_last_bn=True), images)
    assert plain.shape == (7,) and np.all(plain > 0)  # a plain block is never zero-initialised


def test_layer_responses_zero_init_is_exactly_zero(images):
    """A zero-initialised last BN scale makes every branch output (each block's second layer)
    exactly 0: in train mode, and in eval mode too (running mean 0, var 1: the output is
    0 * x / sqrt(1 + eps) + 0); the stem and each block's first layer are not zero."""
    model = tiny("cifar_resnet8", zero_init_last_bn=True)
    for train in (True, False):
        values = layer_responses.layer_responses(model, images, train=train)
        # [stem, block1 conv1, block1 conv2, ...]: every block's conv2 (bn2) is zero.
        assert np.all(values[2::2] == 0.0) and values[0] > 0 and np.all(values[1::2] > 0), (train, values)


def _perturbed(model, seed=0):
    """``model`` with non-trivial weights and BN running statistics (positive variances), in eval mode."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params))
    stats = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    new = {}
    for path, v in stats:
        noise = rng.normal(size=v.shape).astype(np.float32)
        new[path] = v[...] * np.exp(0.5 * noise) if path[-1] == "var" else v[...] + 0.5 * noise
    nnx.update(model, nnx.from_flat_state(list(new.items())))
    model.eval()
    return model


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_plain20"])
def test_layer_responses_are_every_3x3_layer_of_a_20_layer_net(name, images):
    """Paper 1, Fig. 7: "the outputs of each 3x3 layer, after BN and before other nonlinearity
    (ReLU/addition)". A 20-layer CIFAR net has 19 such layers: the stem and 2 per block x 9 blocks
    (before: 9 values, one per block, bn2's only). Each value is the std of a hand-written forward's
    bn1 (before the ReLU) and bn2 (before the addition) outputs on the same weights and running
    statistics; a scan_blocks=True build of the same weights gives the same values."""
    model = _perturbed(tiny(name, zero_init_last_bn=False, scan_blocks=False))
    values = layer_responses.layer_responses(model, images)
    names = model.conv_response_names()
    assert len(values) == len(names) == 19 == 1 + 2 * 9
    expected_names = ["stem"] + [f"stage{i}.block{j}.conv{k}" for i in (1, 2, 3) for j in (1, 2, 3) for k in (1, 2)]
    assert names == expected_names

    # The hand-written forward, eval mode (the model was switched): stem conv-BN-ReLU, then per
    # block conv1-bn1 | ReLU | conv2-bn2 | + shortcut, ReLU.
    x = jnp.asarray(images)
    h = model.bn1(model.conv1(x))
    expected = [np.std(np.asarray(h, np.float64))]
    x = jax.nn.relu(h)
    for stage in model.stages:
        for block in stage.blocks:
            h1 = block.bn1(block.conv1(x))
            h2 = block.bn2(block.conv2(jax.nn.relu(h1)))
            expected += [np.std(np.asarray(h1, np.float64)), np.std(np.asarray(h2, np.float64))]
            x = block(x)  # the block's own forward: relu(shortcut + h2), or relu(h2) in a plain net
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    np.testing.assert_allclose(model(jnp.asarray(images)), model.fc(jnp.mean(x, axis=(1, 2))), rtol=1e-4, atol=1e-5)
    # bn1's outputs (before the ReLU) are the odd-numbered block layers: not bn2's.
    assert not np.allclose(values[1::2], values[2::2], rtol=1e-2)

    scanned = create_model(name, num_classes=10, rngs=nnx.Rngs(0), width=4, zero_init_last_bn=False, scan_blocks=True)
    assert all(s.scanned is not None for s in scanned.stages)
    state = nnx.to_pure_dict(nnx.state(model))
    for i, stage in state["stages"].items():
        blocks = stage["blocks"]
        rest = [blocks[j] for j in range(1, len(blocks))]
        state["stages"][i] = {"blocks": {0: blocks[0]}, "scanned": jax.tree.map(lambda *a: jnp.stack(a), *rest)}
    scanned_state = nnx.state(scanned)
    nnx.replace_by_pure_dict(scanned_state, state)
    nnx.update(scanned, scanned_state)
    assert scanned.conv_response_names() == names
    np.testing.assert_allclose(layer_responses.layer_responses(scanned, images), values, rtol=1e-5)


def test_plot_layer_responses(tmp_path):
    out = layer_responses.plot_layer_responses(
        {"plain-8": [0.9, 0.5, 0.7], "ResNet-8": [0.4, 0.3, 0.2]}, tmp_path / "fig7.png", plain_labels={"plain-8"}
    )
    assert is_png(out)


# --- gradient flow ------------------------------------------------------------------------------


def test_gradient_norms_in_network_order(images):
    """One finite norm per conv kernel and the fc kernel in network order: the stem first, each
    block's branch convs then its projection shortcut, each block of a scanned stack, fc last."""
    batch = {"image": images, "label": np.arange(len(images)) % 10}
    model = tiny("cifar_resnet14", shortcut="B", scan_blocks=True, zero_init_last_bn=False)
    norms = gradient_flow.gradient_norms(model, batch)
    stage = [
        "stages.{i}.blocks.0.conv1.kernel",
        "stages.{i}.blocks.0.conv2.kernel",
        "stages.{i}.blocks.0.shortcut.conv.kernel",
        "stages.{i}.scanned.conv1.kernel[0]",
        "stages.{i}.scanned.conv2.kernel[0]",
    ]
    expected = ["conv1.kernel"]
    for i in range(3):
        expected += [s.format(i=i) for s in stage if i > 0 or "shortcut" not in s]  # stage 0 keeps the shape
    names = [n for n, _ in norms]
    assert names == expected + ["fc.kernel"]
    assert all(np.isfinite(v) and v > 0 for _, v in norms)
    assert sum(gradient_flow.is_main_path(n) for n in names) == 14  # the depth of cifar_resnet14

    # Two scanned blocks a stage (cifar_resnet20): block by block, each its own gradient.
    deeper = gradient_flow.gradient_norms(tiny("cifar_resnet20", scan_blocks=True, zero_init_last_bn=False), batch)
    scanned = [(n, v) for n, v in deeper if n.startswith("stages.1.scanned.")]
    assert [n for n, _ in scanned] == [f"stages.1.scanned.conv{c}.kernel[{k}]" for k in (0, 1) for c in (1, 2)]
    assert scanned[0][1] != scanned[2][1] and scanned[1][1] != scanned[3][1]

    # Behind a zero-initialised last BN the whole branch gets no gradient; projections and fc do.
    zero = dict(gradient_flow.gradient_norms(tiny("cifar_resnet14", shortcut="B", scan_blocks=True), batch))
    assert zero["stages.1.scanned.conv1.kernel[0]"] == 0.0 and zero["stages.0.blocks.0.conv2.kernel"] == 0.0
    assert zero["stages.1.blocks.0.shortcut.conv.kernel"] > 0 and zero["fc.kernel"] > 0


def test_cli_on_initialised_models(tmp_path, capsys):
    """--models builds fresh networks (the tiny ones above: their compilations are reused)."""
    out = tmp_path / "init.png"
    common = ["--dataset", "digits", "--width", "4", "--batch_size", "12"]
    argv = ["--models", "cifar_plain8", "cifar_resnet8", *common, "--num_images", "12", "--out", str(out)]
    assert layer_responses.main(argv) == 0
    assert is_png(out)
    printed = capsys.readouterr().out
    assert "plain-8 (init): 7 conv layers" in printed and "ResNet-8 (init): 7 conv layers" in printed
    js = tmp_path / "grad.json"
    argv = ["--models", "cifar_resnet8", *common, "--out", str(tmp_path / "grad.png"), "--json", str(js)]
    assert gradient_flow.main(argv) == 0
    (entry,) = json.loads(js.read_text()).values()
    assert len(entry["norms"]) == 8 and all(n > 0 for _, n in entry["norms"])  # zero_init_last_bn off


# --- fake runs for curves and tables ------------------------------------------------------------


def fake_run(path, model="cifar_resnet20", acc=0.9, seed=0, dataset="cifar10", evals=True, **overrides):
    """A run directory with a config.json like the trainer's and a short metrics.jsonl."""
    cfg = get_base_config()
    cfg.model.name = model
    cfg.dataset.name = dataset
    cfg.seed = seed
    for k, v in overrides.items():
        setattr(cfg, k, v)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    rows = []
    for step in (100, 200, 300, 400):
        rows.append({"step": step, "train/loss": 1.0 / step, "train/top1_acc": acc + 0.02, "train/lr": 0.1})
        if evals and step % 200 == 0:
            rows.append({"step": step, "eval/loss": 0.5, "eval/top1_acc": acc - (0.05 if step < 400 else 0.0)})
    write_metrics(path, rows)
    return path


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "runs"
    runs = [fake_run(root / f"resnet20_s{s}", acc=a, seed=s) for s, a in enumerate((0.91, 0.92, 0.93))]
    runs.append(fake_run(root / "plain20", model="cifar_plain20", acc=0.88))
    runs.append(fake_run(root / "resnet56", model="cifar_resnet56", acc=0.94))
    return root, runs


def test_curves_plot(fake_runs, tmp_path, capsys):
    _, runs = fake_runs
    out = curves.plot_error_curves({"ResNet-20": runs[0], "plain-20": runs[3]}, tmp_path / "fig6.png")
    assert is_png(out)
    steps, errors = curves.error_curves(runs[0])["test"]
    assert steps == [200, 400] and errors == pytest.approx([14.0, 9.0])
    steps, errors = curves.error_curves(runs[0])["train"]  # train/top1_acc 0.93: 7% training error
    assert steps == [100, 200, 300, 400] and errors == pytest.approx([7.0] * 4)
    # CLI: default labels from the configs (repeated ones made unique), no overwrite.
    out2 = tmp_path / "cli.png"
    assert curves.main(["--runs", *map(str, runs), "--out", str(out2)]) == 0
    assert is_png(out2)
    assert curves.main(["--runs", str(runs[0]), "--out", str(out2)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert curves.main(["--runs", str(runs[0]), "--out", str(out2), "--overwrite"]) == 0


def test_results_table_groups_seeds(fake_runs, tmp_path, capsys):
    root, runs = fake_runs
    fake_run(root / "no_eval", evals=False)  # skipped: no eval row
    rows = results_table.collect(results_table.find_workdirs(root))
    by_model = {r.model: r for r in rows}
    assert [r.model for r in rows] == ["plain-20", "ResNet-20", "ResNet-56"]
    r20 = by_model["ResNet-20"]
    assert r20.n == 3 and r20.shortcut == "A" and r20.setting == ""
    assert r20.error_text() == "8.00 ± 1.00"  # errors 9, 8, 7: sample std (ddof=1) is 1
    assert r20.paper.error == 8.75 and by_model["ResNet-56"].paper.error == 6.97
    assert by_model["plain-20"].paper is None and by_model["plain-20"].shortcut == "none"
    md = results_table.to_markdown(rows)
    line = next(ln for ln in md.splitlines() if "ResNet-20" in ln)
    assert "8.00 ± 1.00" in line and "8.75" in line and "| 3 |" in line
    assert "setting" not in md
    tex = results_table.to_latex(rows)
    assert "\\begin{tabular}" in tex and "8.00 $\\pm$ 1.00" in tex and "\\end{tabular}" in tex

    # A run with another learning rate is its own group, named by the differing key.
    fake_run(root / "resnet20_lr", acc=0.95, learning_rate=0.2)
    rows = results_table.collect(results_table.find_workdirs(root))
    settings = {(r.model, r.setting): r.n for r in rows}
    assert settings[("ResNet-20", "learning_rate=0.2")] == 1 and settings[("ResNet-20", "learning_rate=0.1")] == 3

    md_out, tex_out = tmp_path / "t.md", tmp_path / "t.tex"
    argv = ["--root", str(root), "--markdown", str(md_out), "--latex", str(tex_out)]
    assert results_table.main(argv) == 0
    assert "8.00 ± 1.00" in capsys.readouterr().out
    assert "\\begin{tabular}" in tex_out.read_text() and "8.75" in md_out.read_text()
    assert results_table.main(argv) == 2
    assert "exists" in one_line_error(capsys)


def test_results_table_reads_a_run_recorded_before_newer_keys_existed(fake_runs):
    """A config.json without the keys added since (init_from, dataset.lighting_std) holds those
    keys' defaults: its seed joins the others instead of a group of its own."""
    root, runs = fake_runs
    cfg = json.loads((runs[0] / "config.json").read_text())
    del cfg["init_from"], cfg["dataset"]["lighting_std"]
    (runs[0] / "config.json").write_text(json.dumps(cfg))
    rows = results_table.collect(results_table.find_workdirs(root))
    r20 = next(r for r in rows if r.model == "ResNet-20")
    assert r20.n == 3 and r20.setting == ""
    # A run that does set one of them is told apart by it.
    fake = fake_run(root / "lit", acc=0.95)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["dataset"]["lighting_std"] = 0.1
    (fake / "config.json").write_text(json.dumps(cfg))
    rows = results_table.collect(results_table.find_workdirs(root))
    settings = {r.setting: r.n for r in rows if r.model == "ResNet-20"}
    assert settings == {"dataset.lighting_std=0.0": 3, "dataset.lighting_std=0.1": 1}


def test_results_table_groups_by_where_step_0_came_from(fake_runs):
    """Runs started from trained weights are grouped by run_info.json's record (source, step,
    head), not by config.json's init_from keys: the same source named by two paths or head
    policies is one group, the same path at two of its checkpoints is two."""
    root, runs = fake_runs

    def warm(name, source, step, recorded_head="loaded", seed=0, **config):
        wd = fake_run(root / name, acc=0.95, seed=seed)
        cfg = json.loads((wd / "config.json").read_text())
        cfg["init_from"].update(config)
        (wd / "config.json").write_text(json.dumps(cfg))
        record = {"path": source, "kind": "run", "step": step, "model": "cifar_resnet20", "head": recorded_head}
        (wd / "run_info.json").write_text(json.dumps({"init_from": record}))

    warm("a0", "/runs/src", 40, path="/runs/src")
    warm("a1", "/runs/src", 40, seed=1, path="../runs/src", head="load")
    warm("b0", "/runs/src", 80, path="/runs/src")
    warm("c0", "/runs/src", 40, "new", path="/runs/src", head="reset")
    rows = [r for r in results_table.collect(results_table.find_workdirs(root)) if r.model == "ResNet-20"]
    settings = {r.setting: r.n for r in rows}
    assert settings == {
        "init_from=None": 3,
        "init_from=/runs/src@40": 2,
        "init_from=/runs/src@80": 1,
        "init_from=/runs/src@40, new head": 1,
    }
    # The paper's number (ResNet-20 from scratch, 8.75) stands beside the runs trained as it was only.
    papers = {r.setting: r.paper.error if r.paper else None for r in rows}
    assert papers == {s: (8.75 if s == "init_from=None" else None) for s in settings}
    fake_run(root / "probe", acc=0.5, trainable="head")  # a linear probe of a random network
    rows = [r for r in results_table.collect(results_table.find_workdirs(root)) if r.model == "ResNet-20"]
    papers = {r.setting: r.paper.error if r.paper else None for r in rows}
    assert papers["init_from=None, trainable=head"] is None and papers["init_from=None, trainable=all"] == 8.75


def test_run_labels_name_the_shortcut():
    from resnet_jax.analysis.common import run_label

    assert run_label({"model": {"name": "cifar_resnet20", "shortcut": None}}) == "ResNet-20"
    assert run_label({"model": {"name": "cifar_resnet20", "shortcut": "B"}}) == "ResNet-20 (B)"
    assert run_label({"model": {"name": "cifar_plain20", "shortcut": None}}) == "plain-20"
    # Before: "ResNet-20", the label of the residual network it is not.
    assert run_label({"model": {"name": "cifar_resnet20", "shortcut": "none"}}) == "ResNet-20 (no shortcuts)"


def test_repeated_labels_take_as_much_of_the_path_as_tells_them_apart():
    from resnet_jax.analysis.common import unique_labels

    runs = ["sweep/r8_B/seed0", "sweep/r8_C/seed0", "sweep/r8_B/seed1", "other/plain8"]
    labels = ["ResNet-8", "ResNet-8", "ResNet-8", "plain-8"]
    assert unique_labels(labels, runs) == [
        "ResNet-8 [r8_B/seed0]",
        "ResNet-8 [r8_C/seed0]",
        "ResNet-8 [r8_B/seed1]",
        "plain-8",
    ]
    assert unique_labels(["a", "a"], ["x/s0", "x/s1"]) == ["a [s0]", "a [s1]"]


def test_results_table_warns_of_an_unfinished_run(tmp_path, caplog):
    done, cut = fake_run(tmp_path / "s0"), fake_run(tmp_path / "s1", seed=1)
    (done / "run_info.json").write_text(json.dumps({"total_steps": 400}))
    (cut / "run_info.json").write_text(json.dumps({"total_steps": 800}))
    with caplog.at_level("WARNING", logger="resnet_jax"):
        (row,) = results_table.collect([done, cut])
    assert row.n == 2
    warned = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert warned == [f"{cut} is unfinished: its last eval is at step 400 of 800 (shown in 'iterations')"]


def test_paper_names_and_numbers_of_paper_2s_bottleneck_nets(tmp_path):
    from resnet_jax.analysis.common import pretty_model_name

    names = ["cifar_resnet56", "plain34", "cifar_preact_resnet164", "cifar_bottleneck_resnet164", "preact_resnet200"]
    assert [pretty_model_name(n) for n in names] == [
        "ResNet-56",
        "plain-34",
        "pre-act ResNet-164",
        "ResNet-164 (original)",
        "pre-act ResNet-200",
    ]
    runs = [
        fake_run(tmp_path / "org", model="cifar_bottleneck_resnet164", acc=0.94),
        fake_run(tmp_path / "pre", model="cifar_preact_resnet1001", dataset="cifar100", acc=0.77),
    ]
    rows = {r.model: r for r in results_table.collect(runs)}
    assert rows["ResNet-164 (original)"].shortcut == "B" and rows["ResNet-164 (original)"].paper.error == 5.93
    assert rows["pre-act ResNet-1001"].paper.error == 22.71


def test_results_table_uses_ten_crop_results_for_imagenet(tmp_path, capsys):
    """The papers' ImageNet errors are 10-crop: a run's eval_<final step>_10crop.json (evaluate
    --eval_crops=10) replaces its centre-crop eval, and the "test views" column says which. Runs
    tested differently are not averaged together; a result of another step is not used."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(root / f"r50_s{seed}", model="resnet50", dataset="imagenet2012", acc=0.75, seed=seed)
    (root / "r50_s0" / "eval_400_10crop.json").write_text(json.dumps({"step": 400, "eval/top1_acc": 0.78}))
    fake_run(root / "r50_s2", model="resnet50", dataset="imagenet2012", acc=0.70, seed=2)
    (root / "r50_s2" / "eval_200_10crop.json").write_text(json.dumps({"step": 200, "eval/top1_acc": 0.99}))
    rows = results_table.collect(results_table.find_workdirs(root))
    by_views = {r.views: r for r in rows}
    assert sorted(by_views) == [1, 10]
    assert by_views[10].errors == pytest.approx([22.0]) and by_views[10].workdirs == [str(root / "r50_s0")]
    assert sorted(by_views[1].errors) == pytest.approx([25.0, 30.0])  # s2's 10-crop file is of step 200
    assert by_views[10].paper.error == 22.85 and by_views[10].paper.note == "10-crop"
    md = results_table.to_markdown(rows)
    assert "| test views |" in md.splitlines()[0]
    assert any("| 10 | 22.00 | 22.85 (10-crop) |" in ln for ln in md.splitlines())
    assert "test views" in results_table.to_latex(rows)
    # CIFAR tables keep their columns: the views appear only for ImageNet or 10-view results.
    cifar = tmp_path / "cifar"
    fake_run(cifar / "r20")
    assert "test views" not in results_table.to_markdown(results_table.collect([cifar / "r20"]))
    # A damaged result file is a one-line error, not a traceback.
    (root / "r50_s0" / "eval_400_10crop.json").write_text("{")
    assert results_table.main(["--root", str(root)]) == 2
    assert "eval_400_10crop.json is not an evaluate result" in one_line_error(capsys)


def test_other_size_results_of_a_step_come_smallest_size_first(tmp_path):
    """(step, error %, views, size) per sized result of that step only, by size then views."""
    for name, acc in (
        ("eval_4_320px", 0.7),
        ("eval_4_10crop_256px", 0.8),
        ("eval_4_256px", 0.75),
        ("eval_40_128px", 0.1),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps({"eval/top1_acc": acc}))
    got = results_table.other_size_results(tmp_path, 4)
    assert [r[2:] for r in got] == [(1, 256), (10, 256), (1, 320)]
    assert [r[0] for r in got] == [4, 4, 4] and got[0][1] == pytest.approx(25.0)


def test_results_table_shows_other_test_sizes_as_their_own_rows(tmp_path, capsys):
    """Paper 2 tests its ResNet-200s on 320 crops: evaluate --eval_image_size=320 writes
    eval_<step>_320px.json, a row of its own with the size in a "test size" column, and only that
    row carries the paper's single 320-crop number. Files of another step are not read."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(root / f"s{seed}", model="preact_resnet200", dataset="imagenet2012", acc=0.77, seed=seed)
        (root / f"s{seed}" / "eval_400_320px.json").write_text(json.dumps({"eval/top1_acc": 0.79 + seed / 100}))
    (root / "s0" / "eval_400_10crop_320px.json").write_text(json.dumps({"eval/top1_acc": 0.81}))
    (root / "s1" / "eval_200_320px.json").write_text(json.dumps({"eval/top1_acc": 0.99}))
    rows = results_table.collect(results_table.find_workdirs(root))
    by = {(r.test_size, r.views): r for r in rows}
    assert sorted(by, key=str) == sorted([(None, 1), (320, 1), (320, 10)], key=str)
    assert by[(None, 1)].errors == pytest.approx([23.0, 23.0]) and by[(None, 1)].paper is None
    assert sorted(by[(320, 1)].errors) == pytest.approx([20.0, 21.0])
    # paper 2 tests a single 320 crop: not beside the 10-crop one
    assert by[(320, 1)].paper.error == 20.7 and by[(320, 10)].paper is None
    assert by[(320, 10)].errors == pytest.approx([19.0]) and by[(320, 10)].n == 1
    md = results_table.to_markdown(rows).splitlines()
    assert "| test size |" in md[0]
    assert any("| as trained | 23.00 ± 0.00 | – |" in ln for ln in md)
    assert any("| 1 | 320 | 20.50 ± 0.71 | 20.70 (320 crop) |" in ln for ln in md)
    assert "test size" not in results_table.to_markdown([by[(None, 1)]])  # only when some row has one
    (root / "s0" / "eval_400_320px.json").write_text("[]")
    assert results_table.main(["--root", str(root)]) == 2
    assert "eval_400_320px.json is not an evaluate result" in one_line_error(capsys)


@pytest.mark.parametrize("module", [layer_responses, gradient_flow, curves, results_table])
def test_cli_errors_are_one_line(module, tmp_path, capsys):
    argv = ["--runs", str(tmp_path / "missing")]
    if module is not results_table:
        argv += ["--out", str(tmp_path / "x.png")]
    assert module.main(argv) == 2
    assert "does not exist" in one_line_error(capsys)
    with pytest.raises(SystemExit) as e:
        module.main(["--no_such_flag"])
    assert e.value.code == 2
    one_line_error(capsys)


def test_cli_errors_without_runs(tmp_path, capsys):
    assert layer_responses.main(["--out", str(tmp_path / "x.png")]) == 2
    assert "nothing to analyse" in one_line_error(capsys)
    assert gradient_flow.main(["--models", "cifar_resnet7", "--out", str(tmp_path / "x.png")]) == 2
    assert "6n+2" in one_line_error(capsys)
    assert results_table.main([]) == 2
    one_line_error(capsys)


# --- a real run ---------------------------------------------------------------------------------


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = user_env()
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 3-step digits run of CIFAR ResNet-8 with a checkpoint at step 3.

    Width 4, as the tiny networks above: the in-process tests then reuse their compilations
    (initialisers and gradients), which keeps this module's CPU time low.
    """
    wd = tmp_path_factory.mktemp("digits_run")
    p = run_module(
        "resnet_jax.train",
        "--config=experiments/digits.py",
        f"--workdir={wd}",
        "--config.model.name=cifar_resnet8",
        "--config.model.width=4",
        "--config.batch_size=32",
        "--config.num_steps=3",
        "--config.progress_bar=false",
        "--config.plot_curves=false",  # matplotlib: 1-1.5 s of each short run
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def test_load_model_restores_the_run_without_its_dataset(digits_run, monkeypatch, caplog):
    """load_model gives the network of a checkpoint for inference: its predictions on the eval
    split reproduce the run's logged eval accuracy. The dataset facts come from run_info.json (so
    a run can be moved to a machine without its data); 'best' and int steps work; a step that is
    not kept is named as such, not as damage. Orbax's "Given directory is read only" (twice per
    call before) is not logged."""
    import jax.numpy as jnp

    from resnet_jax import data
    from resnet_jax.analysis.common import load_config, load_model
    from resnet_jax.errors import UserError
    from resnet_jax.logbook import read_metrics
    from resnet_jax.train import evaluate_checkpoint

    config = load_config(digits_run)
    batches = list(data.eval_batches(config.dataset, global_batch_size=64))
    info = data.get_info(config.dataset)

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was looked up")

    monkeypatch.setattr(data, "get_info", no_data)
    model, step = load_model(digits_run)
    assert step == 3 and load_model(digits_run, "best")[1] == 3 and load_model(digits_run, 3)[1] == 3
    correct = total = 0
    for b in batches:
        logits = model(data.model_input(jnp.asarray(b["image"]), info.pixels))
        hits = (np.asarray(logits).argmax(-1) == b["label"]) * b["mask"]
        correct, total = correct + hits.sum(), total + b["mask"].sum()
    (last,) = [r for r in read_metrics(digits_run) if "eval/top1_acc" in r and r["step"] == 3]
    assert correct / total == pytest.approx(last["eval/top1_acc"], abs=1e-6)
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
    with pytest.raises(UserError, match=r"no checkpoint at step 7; kept steps: \[3\]"):
        load_model(digits_run, 7)
    monkeypatch.undo()
    assert evaluate_checkpoint(str(digits_run), 3)[0] == 3  # an int step (was: AttributeError)


def test_layer_responses_cli_on_checkpoint(digits_run, tmp_path):
    out, js = tmp_path / "fig7.png", tmp_path / "fig7.json"
    p = run_module(
        "resnet_jax.analysis.layer_responses", "--runs", str(digits_run), "--out", str(out), "--json", str(js)
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert is_png(out)
    (entry,) = json.loads(js.read_text()).values()
    assert entry["step"] == 3 and len(entry["std"]) == 7 and all(v > 0 for v in entry["std"])
    assert entry["layers"][:3] == ["stem", "stage1.block1.conv1", "stage1.block1.conv2"] and len(entry["layers"]) == 7
    assert "ResNet-8" in p.stdout


def test_gradient_flow_cli_on_run(digits_run, tmp_path, capsys):
    out, js = tmp_path / "grad.png", tmp_path / "grad.json"
    argv = ["--runs", str(digits_run), "--steps", "0", "3", "--batch_size", "12", "--out", str(out), "--json", str(js)]
    assert gradient_flow.main(argv) == 0
    assert is_png(out)
    result = json.loads(js.read_text())
    assert sorted(r["step"] for r in result.values()) == [0, 3]
    for r in result.values():
        assert [n for n, _ in r["norms"]][0] == "conv1.kernel" and len(r["norms"]) == 8
    assert gradient_flow.main([*argv[:4], "7", *argv[4:], "--overwrite"]) == 2
    assert "kept steps" in one_line_error(capsys)


# --- bad input: one line, nothing touched -------------------------------------------------------


@pytest.fixture(scope="module")
def damaged_run(digits_run, tmp_path_factory):
    """A copy of ``digits_run`` whose checkpoint lost its array data files."""
    wd = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(digits_run, wd)
    (data,) = wd.glob("checkpoints/3/default/ocdbt.process_0/d")
    shutil.rmtree(data)
    return wd


def test_damaged_checkpoint_is_one_line(damaged_run, tmp_path, capfd, caplog, monkeypatch):
    """layer_responses and gradient_flow name the run and the step of a checkpoint that cannot be
    restored, before any analysis; Orbax's failed reads leave no task behind (no "Task exception
    was never retrieved" when they are collected, no "Event loop is closed" from TensorStore)."""
    unraisable = []  # TensorStore's callbacks into a closed loop end here
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
    before = tree(damaged_run)
    out = tmp_path / "x.png"
    for module, extra in ((layer_responses, []), (gradient_flow, ["--steps", "0", "3"])):
        assert module.main(["--runs", str(damaged_run), "--out", str(out), *extra]) == 2
        err = one_line_error(capfd)
        assert f"{damaged_run}: checkpoint 3 cannot be restored" in err and "train the run again" in err
    time.sleep(0.5)  # TensorStore's reads that outlived a closed loop would report by now
    gc.collect()
    assert not unraisable, unraisable[:3]
    assert not capfd.readouterr().err
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert not out.exists() and tree(damaged_run) == before


def test_evaluate_damaged_checkpoint_is_one_line(damaged_run):
    """evaluate's one line is all: nothing from Orbax's abandoned tasks after it (in 5 of 8 tries
    before the fix)."""
    before = tree(damaged_run)
    p = run_module("resnet_jax.evaluate", f"--workdir={damaged_run}")
    assert_one_line_error(p, "checkpoint", "cannot be restored", "try another --checkpoint", max_lines=1)
    assert tree(damaged_run) == before


def test_checkpoint_choice_errors(digits_run, tmp_path, capsys, caplog):
    """--checkpoint says what it accepts; a step that is not kept lists the kept ones; Orbax's
    "Given directory is read only" is not shown (a subprocess: absl's handler prints it)."""
    out = tmp_path / "x.png"
    for value in ("best", "abc"):
        assert layer_responses.main(["--runs", str(digits_run), "--out", str(out), f"--checkpoint={value}"]) == 2
        assert f"--checkpoint='{value}': use 'latest' or a checkpoint step number" in one_line_error(capsys)
    assert layer_responses.main(["--runs", str(digits_run), "--out", str(out), "--checkpoint=99"]) == 2
    assert "no checkpoint at step 99; kept steps: [3]" in one_line_error(capsys)
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
    p = run_module("resnet_jax.analysis.gradient_flow", "--runs", str(digits_run), "--steps", "5", "--out", str(out))
    assert_one_line_error(p, "no checkpoint at step 5; kept steps: [3]", max_lines=1)
    assert not out.exists()


def test_the_same_run_twice_is_refused(fake_runs, tmp_path, capsys):
    """A run given twice (also as another path to it) would count as two seeds, or two lines."""
    _, runs = fake_runs
    r = str(runs[0])
    assert results_table.main(["--runs", r, r]) == 2
    assert "is given twice; give each run directory once" in one_line_error(capsys)
    assert results_table.main(["--runs", r, os.path.join(r, "..", runs[0].name) + "/"]) == 2
    assert "is given twice (as " in one_line_error(capsys)
    assert curves.main(["--runs", r, r, "--out", str(tmp_path / "c.png")]) == 2
    assert "is given twice" in one_line_error(capsys)
    assert not (tmp_path / "c.png").exists()


def test_a_file_is_not_a_run_directory(fake_runs, tmp_path, capsys):
    _, runs = fake_runs
    f = str(runs[0] / "config.json")
    for module, argv in (
        (curves, ["--runs", f, "--out", str(tmp_path / "c.png")]),
        (layer_responses, ["--runs", f, "--out", str(tmp_path / "c.png")]),
        (results_table, ["--runs", f]),
    ):
        assert module.main(argv) == 2
        assert "is not a directory; give the --workdir (folder) of a training run" in one_line_error(capsys)
    assert results_table.main(["--root", f]) == 2
    assert f"--root {f} is not a directory" in one_line_error(capsys)
    p = run_module("resnet_jax.evaluate", f"--workdir={f}")
    assert_one_line_error(p, "is not a directory", max_lines=1)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--eval_crops=0"], ["--eval_crops=0: use 1 (centre crop) or 10"]),
        (["--eval_crops=3"], ["--eval_crops=3: use 1"]),
        (["stray"], ["unexpected arguments ['stray']"]),
    ],
)
def test_evaluate_refuses_bad_arguments(digits_run, args, needles):
    """Refused before JAX is imported (fast), and nothing is written."""
    before = tree(digits_run)
    assert_one_line_error(run_module("resnet_jax.evaluate", f"--workdir={digits_run}", *args), *needles, max_lines=1)
    assert tree(digits_run) == before


def test_evaluate_result_names_keep_each_crop_count():
    """A 10-crop result of a step does not replace its centre-crop one; the 1-crop name is as before."""
    from resnet_jax.workdir import result_path

    names = [result_path("W", 3).name, result_path("W", 3, 1).name, result_path("W", 3, 10).name]
    assert names == ["eval_3.json", "eval_3.json", "eval_3_10crop.json"]
    assert [result_path("W", 3, 1, 320).name, result_path("W", 3, 10, 320).name] == [
        "eval_3_320px.json",
        "eval_3_10crop_320px.json",
    ]


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_demo_refuses_non_positive_num_steps(tmp_path, steps):
    wd = tmp_path / "demo"
    p = run_module("resnet_jax.demo", "--models=cifar_resnet8", f"--num_steps={steps}", f"--workdir={wd}")
    assert_one_line_error(p, f"--num_steps={steps}: give a positive number of steps", max_lines=1)
    assert not wd.exists()


def test_an_output_under_a_file_is_refused_before_any_work(fake_runs, tmp_path, capsys):
    """Before: "cannot create the directory of ... (File exists)", which did not say why."""
    _, runs = fake_runs
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "c.png"
    assert curves.main(["--runs", str(runs[0]), "--out", str(out)]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a directory; choose another path" in one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine"


def test_eval_images_stop_at_the_split_without_its_padding():
    """Asked for more images than the eval split holds (digits: 360), eval_images returns the
    split, each image once: the rows that pad the last batch are not data."""
    from resnet_jax.analysis.common import eval_images

    cfg = get_base_config().dataset
    cfg.name = "digits"
    images, labels = eval_images(cfg, num_images=1000, batch_size=128)
    assert images.shape[0] == labels.shape[0] == 360
    assert len({im.tobytes() for im in images}) > 300  # not example 0 repeated
    first, _ = eval_images(cfg, num_images=5, batch_size=128)
    np.testing.assert_array_equal(first, images[:5])
