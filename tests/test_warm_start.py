"""Starting a run from trained weights (``config.init_from``): a run's checkpoint or converted
weights, exactly restored, a new head when the classes differ, stacked and unrolled stages, the
refusals, and a resumed run that no longer needs its source."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from cli_env import assert_one_line_error
from flax import nnx
from test_train import SHORT, run_cli

from resnet_jax import data, train, warm_start
from resnet_jax.checkpointing import Checkpointer
from resnet_jax.config import get_base_config
from resnet_jax.convert import save_converted
from resnet_jax.errors import UserError
from resnet_jax.models import create_model
from resnet_jax.schedules import Durations

# The command line of config_for()'s network and data, one step.
TINY_RUN = [
    "--config=experiments/digits.py",
    "--config.model.name=cifar_resnet8",
    "--config.model.width=4",
    "--config.dataset.name=synthetic",
    "--config.dataset.image_size=8",
    "--config.dataset.num_classes=10",
    "--config.dataset.num_examples=64",
    "--config.batch_size=8",
    "--config.num_steps=1",
]


def config_for(name: str = "cifar_resnet8", num_classes: int = 10, **model):
    c = get_base_config()
    c.model.name, c.model.width, c.batch_size = name, 4, 8
    c.model.update(model)
    c.dataset.name, c.dataset.image_size, c.dataset.num_classes = "synthetic", 8, num_classes
    return c


def trainer_for(config) -> train.Trainer:
    info = data.get_info(config.dataset)
    return train.Trainer(config, info, Durations.from_config(config, info.num_train))


def weights(state) -> dict[str, np.ndarray]:
    trees = (state["params"], state["batch_stats"])
    return {warm_start.dotted(p): np.asarray(a) for t in trees for p, a in jax.tree_util.tree_flatten_with_path(t)[0]}


def save_run(path, config, step: int = 5):
    """A run's workdir holding one real checkpoint whose weights are not any initialisation's
    (every array shifted by a different amount), as ``(state, workdir)``."""
    trainer = trainer_for(config)
    state = trainer.init_state()
    leaves, treedef = jax.tree_util.tree_flatten(state)
    state = jax.tree_util.tree_unflatten(treedef, [a + 0.25 * (i + 1) for i, a in enumerate(leaves)])
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    ckpt = Checkpointer(path)
    ckpt.save(step, state, force=True)
    ckpt.close()
    return state, path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("src") / "run", config_for())


def start(config):
    trainer = trainer_for(config)
    warm = warm_start.from_config(config, trainer.weight_shapes())
    return warm, trainer.start_state(warm), trainer


def test_a_run_checkpoint_is_restored_exactly_with_a_fresh_optimizer(source):
    saved, path = source
    config = config_for()
    config.init_from.path = str(path)
    warm, state, trainer = start(config)
    assert warm.record() == {"path": str(path), "kind": "run", "step": 5, "model": "cifar_resnet8", "head": "loaded"}
    ours, theirs = weights(state), weights(saved)
    assert ours.keys() == theirs.keys() and "fc.kernel" in ours and "stages.2.blocks.0.bn2.var" in ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # The optimizer, the step and the guard's count start from zero, as in a fresh run.
    fresh = trainer.init_state()
    for a, b in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(fresh["opt_state"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state["step"]) == 0 and int(state["nonfinite"]) == 0
    # The state is laid out as the trainer's own (its first step takes it as is).
    assert jax.tree.map(lambda a: a.sharding, state) == trainer.state_shardings


@pytest.mark.parametrize("head", ["auto", "reset"])
def test_other_classes_or_reset_get_a_new_head(source, head):
    """auto: 5 classes against the source's 10 -> the fresh head; reset: a fresh head even when it
    would fit. The rest is the source's either way."""
    saved, path = source
    config = config_for(num_classes=5 if head == "auto" else 10)
    config.init_from.path, config.init_from.head = str(path), head
    warm, state, trainer = start(config)
    assert warm.new_head and warm.record()["head"] == "new"
    ours, theirs, fresh = weights(state), weights(saved), weights(trainer.init_state())
    for name in ours:
        expected = fresh[name] if name.startswith("fc.") else theirs[name]
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def test_stacked_and_unrolled_stages_convert_both_ways(tmp_path):
    unrolled_cfg, scanned_cfg = config_for("cifar_resnet20"), config_for("cifar_resnet20", scan_blocks="true")
    for src_cfg, dst_cfg, name in ((unrolled_cfg, scanned_cfg, "u"), (scanned_cfg, unrolled_cfg, "s")):
        saved, path = save_run(tmp_path / name, src_cfg)
        dst_cfg.init_from.path = str(path)
        _, state, _ = start(dst_cfg)
        ours, theirs = weights(state), weights(saved)
        # cifar_resnet20: 3 blocks per stage, the last two stacked when scanned.
        stacked, single = (ours, theirs) if name == "u" else (theirs, ours)
        assert stacked["stages.1.scanned.conv2.kernel"].shape[0] == 2
        for j in (1, 2):
            np.testing.assert_array_equal(
                stacked["stages.1.scanned.conv2.kernel"][j - 1], single[f"stages.1.blocks.{j}.conv2.kernel"]
            )
        assert sum(a.size for a in ours.values()) == sum(a.size for a in theirs.values())


def test_converted_weights_are_restored(tmp_path):
    """A ``resnet_jax.convert`` directory (``save_converted``: the model's nnx state)."""
    model = create_model("cifar_resnet8", num_classes=10, width=4, rngs=nnx.Rngs(3))
    _, state = nnx.split(model)
    state = jax.tree.map(lambda a: a + 1.5, state)
    nnx.update(model, state)
    save_converted(model, tmp_path / "conv", name="cifar_resnet8", num_classes=10, options={"width": 4})
    config = config_for()
    config.init_from.path = str(tmp_path / "conv")
    warm, out, _ = start(config)
    assert warm.record()["kind"] == "converted" and not warm.new_head
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    expected = weights({"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)})
    ours = weights(out)
    assert ours.keys() == expected.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)


@pytest.mark.parametrize(
    "change, needles",
    [
        (
            {"width": 8},
            [
                "does not fit this run's cifar_resnet8",
                "bn1.bias is (4,) there, (8,) here",
                "it holds a cifar_resnet8 (width 4, shortcut A, stride_in 3x3)",
            ],
        ),
        ({"shortcut": "B"}, ["computes another function", "shortcut A there, B here"]),
        ({"name": "cifar_plain8"}, ["shortcut A there, none here"]),
        ({"name": "cifar_resnet14"}, ["stage_sizes (1, 1, 1) there, (2, 2, 2) here"]),
    ],
)
def test_another_network_is_refused(source, change, needles):
    _, path = source
    config = config_for(**{k: v for k, v in change.items() if k != "name"})
    config.model.name = change.get("name", config.model.name)
    config.init_from.path = str(path)
    with pytest.raises(UserError) as e:
        start(config)
    for needle in needles:
        assert needle in str(e.value)


def test_initial_state_follows_init_from(source):
    """Trainer.initial_state (the library's step 0) reads config.init_from; init_state is fresh."""
    saved, path = source
    config = config_for()
    config.init_from.path = str(path)
    trainer = trainer_for(config)
    ours, theirs = weights(trainer.initial_state()), weights(saved)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert not np.array_equal(weights(trainer.init_state())["conv1.kernel"], theirs["conv1.kernel"])


def test_bad_sources_are_refused(source, tmp_path):
    _, path = source
    (tmp_path / "a_file").write_text("x")
    cases = {
        str(tmp_path / "a_file"): "is a file; give the directory of a run or of converted weights",
        str(
            path / "checkpoints" / "5"
        ): r"is a checkpoint step folder; give the run's workdir .* config.init_from.checkpoint=5",
        str(tmp_path / "missing"): "no such directory",
        str(tmp_path): r"neither a run.s workdir \(config.json\) nor converted weights \(model.json\)",
    }
    for where, needle in cases.items():
        config = config_for()
        config.init_from.path = where
        with pytest.raises(UserError, match=needle):
            start(config)
    config = config_for(num_classes=5)
    config.init_from.path, config.init_from.head = str(path), "load"
    with pytest.raises(UserError, match=r"head='load', but its head does not fit \(fc.bias \(10,\) there, \(5,\) here"):
        start(config)
    config = config_for()
    config.init_from.path, config.init_from.checkpoint = str(path), "7"
    with pytest.raises(UserError, match=r"no checkpoint at step 7; kept steps: \[5\]"):
        start(config)
    config.init_from.checkpoint = "best"  # saved without eval metrics
    with pytest.raises(UserError, match="no evaluated checkpoint"):
        start(config)


def test_a_resumed_run_does_not_read_its_source(tmp_path):
    """The command line end to end: a run started from another run's weights records where they
    came from (the analysis tools' step 0 follows that record, not the source's newer
    checkpoints); resumed after the source is gone, it continues from its own checkpoint, says
    that init_from is not read, and keeps the record. --fresh may start from the run's own
    checkpoint (read before it is set aside)."""
    from resnet_jax.analysis.common import RunLoader, load_model

    src, dst = tmp_path / "src", tmp_path / "dst"
    short = [a for a in SHORT if not a.startswith(("--config.num_steps", "--config.checkpoint_every"))]
    short.append("--config.plot_curves=false")
    p = run_cli("resnet_jax.train", *short, "--config.num_steps=2", f"--workdir={src}")
    assert p.returncode == 0, p.stderr[-3000:]
    args = [*short, f"--config.init_from.path={src}", f"--workdir={dst}"]
    p = run_cli("resnet_jax.train", *args, "--config.num_steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"initialised from checkpoint 2 of the run {src} (cifar_resnet8), with its head" in p.stderr
    record = json.loads((dst / "run_info.json").read_text())["init_from"]
    assert record == {"path": str(src), "kind": "run", "step": 2, "model": "cifar_resnet8", "head": "loaded"}
    # The source trains on: step 0 of dst is still its checkpoint 2, not its new latest.
    p = run_cli("resnet_jax.train", *short, "--config.num_steps=4", f"--workdir={src}")
    assert p.returncode == 0, p.stderr[-3000:]
    at_init, then, now = RunLoader(dst).init(), load_model(src, 2)[0], load_model(src, 4)[0]
    kernel = lambda m: np.asarray(m.stages[1].blocks[0].conv1.kernel[...])  # noqa: E731
    np.testing.assert_array_equal(kernel(at_init), kernel(then))
    assert not np.array_equal(kernel(then), kernel(now))
    shutil.rmtree(src)
    p = run_cli("resnet_jax.train", *args, "--config.num_steps=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "config.init_from.path is not read: the run continues from its own checkpoint" in p.stderr
    info = json.loads((dst / "run_info.json").read_text())
    assert info["resumed_from"] == 2 and info["init_from"] == record
    # A new run from the missing source is refused before its workdir is made.
    p = run_cli("resnet_jax.train", *args[:-1], f"--workdir={tmp_path / 'new'}", "--config.num_steps=2")
    assert_one_line_error(p, f"config.init_from.path={src}: no such directory", max_lines=1)
    assert not (tmp_path / "new").exists()
    # Step 0's analysis needs the source, and says so.
    with pytest.raises(
        UserError, match=r"step 0 of this run came from .*src \(run_info.json's init_from\), which is no"
    ):
        RunLoader(dst).init()
    # --fresh would set the source aside with the run's other files: refused, nothing moved.
    before = sorted(p.name for p in dst.iterdir())
    own = [*short, f"--config.init_from.path={dst}", f"--workdir={dst}", "--fresh", "--config.num_steps=2"]
    p = run_cli("resnet_jax.train", *own)
    assert_one_line_error(
        p, "is inside --workdir, whose files --fresh sets aside; move that run elsewhere", max_lines=1
    )
    assert sorted(p.name for p in dst.iterdir()) == before


def test_a_damaged_source_is_one_line_and_nothing_is_written(source, tmp_path):
    """Truncated array files are found when the weights are read, which happens before the
    workdir is made; Orbax's failed reads print nothing after the line."""
    _, path = source
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    files = [f for f in (damaged / "checkpoints").rglob("*") if f.is_file() and "/d/" in str(f)]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:10])
    config = config_for()
    config.init_from.path = str(damaged)
    with pytest.raises(UserError, match="cannot read .*; is it damaged"):
        warm_start.from_config(config, trainer_for(config).weight_shapes()).load()
    p = run_cli("resnet_jax.train", *TINY_RUN, f"--config.init_from.path={damaged}", f"--workdir={tmp_path / 'run'}")
    assert_one_line_error(p, f"cannot read {damaged}", "is it damaged?", max_lines=1)
    assert not (tmp_path / "run").exists()


def test_converted_weights_have_no_steps(tmp_path):
    model = create_model("cifar_resnet8", num_classes=10, width=4, rngs=nnx.Rngs(0))
    save_converted(model, tmp_path / "conv", name="cifar_resnet8", num_classes=10, options={"width": 4})
    config = config_for()
    config.init_from.path, config.init_from.checkpoint = str(tmp_path / "conv"), "7"
    with pytest.raises(UserError, match="holds converted weights \\(one set, no steps\\); leave the key at 'latest'"):
        start(config)


def test_converted_options_are_checked_too(tmp_path):
    """model.json keeps the options apart from the name: a plain (shortcut='none') network saved
    with save_converted is not loaded into an option-A ResNet."""
    model = create_model("cifar_resnet8", num_classes=10, width=4, shortcut="none", rngs=nnx.Rngs(0))
    save_converted(
        model, tmp_path / "conv", name="cifar_resnet8", num_classes=10, options={"width": 4, "shortcut": "none"}
    )
    config = config_for()
    config.init_from.path = str(tmp_path / "conv")
    with pytest.raises(UserError, match="shortcut none there, A here"):
        start(config)


def test_two_processes_start_from_the_same_weights(source, tmp_path):
    """A real 2-process run (2 devices each, parameters sharded over the 4): every process reads
    the source on its own host and the run starts from it. At a learning rate of 1e-30 the first
    step changes no parameter, so the saved step 1 holds the source's parameters bit for bit."""
    from test_train import run_processes

    from resnet_jax.analysis.common import load_model

    saved, path = source
    args = [
        *TINY_RUN,
        "--config.learning_rate=1e-30",
        "--config.warmup_epochs=0",
        "--config.shard_params=true",
        "--config.progress_bar=false",
        "--config.plot_curves=false",
        f"--config.init_from.path={path}",
        f"--workdir={tmp_path / 'run'}",
    ]
    for i, (rc, err) in enumerate(run_processes(args, timeout=240)):
        assert rc == 0, (i, err[-3000:])
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["init_from"]["step"] == 5
    model, step = load_model(tmp_path / "run")
    _, params, _ = nnx.split(model, nnx.Param, ...)
    ours = {
        warm_start.dotted(p): np.asarray(a)
        for p, a in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
    }
    theirs = {warm_start.dotted(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
    assert step == 1 and ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_a_linear_probe_trains_the_head_only(source):
    """trainable='head' from trained weights: after two steps every parameter but fc's and every
    BatchNorm statistic is the source's, bit for bit (BN normalises with its running statistics);
    fc moved; the optimizer keeps momentum for fc alone."""
    saved, path = source
    config = config_for()
    config.init_from.path, config.trainable, config.learning_rate = str(path), "head", 0.5
    warm, state, trainer = start(config)
    momenta = [a for a in jax.tree.leaves(state["opt_state"]) if a.ndim]  # (the schedule's count aside)
    assert sorted(a.shape for a in momenta) == sorted([(10,), (16, 10)])  # fc's bias and kernel
    batches = data.train_batches(config.dataset, global_batch_size=8, seed=0)
    for _ in range(2):
        state, metrics = trainer.train_step(state, data.to_global(next(batches), trainer.batch_sharding))
    ours, theirs = weights(state), weights(saved)
    moved = sorted(n for n in ours if not np.array_equal(ours[n], theirs[n]))
    assert moved == ["fc.bias", "fc.kernel"], moved


def test_extra_source_arrays_are_refused_when_the_function_is_unknown(tmp_path):
    """A source whose recorded model name resolves to nothing (so no function check) but that holds
    more blocks than the target: its extra arrays are refused, not silently dropped."""
    model = create_model("cifar_resnet14", num_classes=10, width=4, rngs=nnx.Rngs(0))
    save_converted(model, tmp_path / "conv", name="someone_elses_net", num_classes=10, options={"width": 4})
    config = config_for()  # cifar_resnet8: a subset of resnet14's arrays, of the same shapes
    config.init_from.path = str(tmp_path / "conv")
    with pytest.raises(UserError, match=r"there has no place here"):
        start(config)


def test_a_source_inside_the_workdir_is_refused(tmp_path):
    """Not only the workdir itself: a run inside it would be set aside by --fresh as well; a
    sibling whose name begins the same is fine."""
    wd = tmp_path / "wd"
    inside = warm_start.Source(wd / "old" / "run", "run", wd / "old" / "run" / "x", 1, {"name": "cifar_resnet8"})
    with pytest.raises(UserError, match="is inside --workdir"):
        warm_start.check_not_set_aside(warm_start.WarmStart(inside, {}, {}, False), wd)
    sibling = warm_start.Source(tmp_path / "wd2", "run", tmp_path / "wd2" / "x", 1, {"name": "cifar_resnet8"})
    warm_start.check_not_set_aside(warm_start.WarmStart(sibling, {}, {}, False), wd)


def test_the_record_of_a_reset_head_rebuilds_a_fresh_head(source):
    """A run started with head='reset' from a source of the same classes: its step 0 rebuilt from
    the record (from_record, as the analyses do) has the fresh head again, not the source's."""
    _, path = source
    config = config_for()
    config.init_from.path, config.init_from.head = str(path), "reset"
    warm, _, trainer = start(config)
    assert warm.new_head
    again = warm_start.from_record(warm.record(), config, trainer.weight_shapes())
    assert again.new_head and again.record() == warm.record()


def test_another_stride_placement_is_refused(tmp_path):
    """A bottleneck's stride on the 1x1 or on the 3x3 conv: the same shapes, another function."""
    src = warm_start.Source(tmp_path, "run", tmp_path / "x", 1, {"name": "resnet50", "stride_in": "1x1"})
    with pytest.raises(UserError, match="stride_in 1x1 there, 3x3 here"):
        warm_start.plan(src, {"name": "resnet50", "stride_in": "3x3"}, {}, "auto")
