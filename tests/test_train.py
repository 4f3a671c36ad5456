"""End-to-end training: a few steps on digits, evaluation, multi-device and multi-process runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from cli_env import user_env

from resnet_jax.logbook import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A short, fast run: a tiny CIFAR ResNet on digits, logging every step.
SHORT = [
    "--config=experiments/digits.py",
    "--config.model.name=cifar_resnet8",
    "--config.batch_size=32",
    "--config.num_steps=6",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=3",
    "--config.eval_every_epochs=100",
    "--config.progress_bar=false",
]


def run_cli(
    module: str, *args: str, devices: int = 1, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` with ``devices`` simulated CPU devices."""
    e = user_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout
    )


def train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: the short run on one device."""
    wd = tmp_path_factory.mktemp("single")
    p = run_cli("resnet_jax.train", *SHORT, f"--workdir={wd}")
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def test_end_to_end_and_evaluate(single_run):
    """A short run writes checkpoints, metrics, event files, curves; evaluate reproduces its numbers."""
    wd = single_run
    assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd))
    assert (wd / "curves.png").stat().st_size > 1000
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["model"]["name"] == "cifar_resnet8" and cfg["num_steps"] == 6
    info = json.loads((wd / "run_info.json").read_text())
    assert info["version"] and "git_commit" in info
    rows = read_metrics(wd)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("train/loss", "train/top1_acc", "train/lr", "train/img_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert all(0 <= r["train/top1_acc"] <= 1 for r in train)
    final = [r for r in rows if "eval/loss" in r][-1]
    assert final["step"] == 6
    for key in ("eval/top1_acc", "eval/top5_acc"):
        assert 0 <= final[key] <= 1
    p = run_cli("resnet_jax.evaluate", f"--workdir={wd}", "--checkpoint=latest")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["step"] == 6
    for key in ("eval/loss", "eval/top1_acc", "eval/top5_acc"):
        assert out[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6)
    p = run_cli("resnet_jax.evaluate", f"--workdir={wd}", "--checkpoint=best")
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["step"] == 6
    # A step by number (the run evaluated only its last): that checkpoint's own numbers, in a
    # result file of its own.
    p = run_cli("resnet_jax.evaluate", f"--workdir={wd}", "--checkpoint=3")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["step"] == 3 and json.loads((wd / "eval_3.json").read_text()) == out
    assert abs(out["eval/loss"] - final["eval/loss"]) > 1e-6  # three steps less trained


def test_eight_devices_match_one(single_run, tmp_path):
    """The same run on 8 simulated devices gives the same losses (BatchNorm over the global batch)."""
    p = run_cli("resnet_jax.train", *SHORT, f"--workdir={tmp_path}", devices=8)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["devices"] == 8
    one, eight = train_losses(single_run), train_losses(tmp_path)
    assert one.keys() == eight.keys()
    np.testing.assert_allclose([eight[k] for k in one], [one[k] for k in one], rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], n: int = 2, timeout: int = 300) -> list[tuple[int, str]]:
    """Runs ``resnet_jax.train args`` as ``n`` real processes on 127.0.0.1 (2 CPU devices each,
    gloo collectives); returns each one's (exit status, stderr)."""
    port = free_port()
    procs = []
    env = user_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    try:
        for i in range(n):
            distributed = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "resnet_jax.train", *args, *distributed],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        try:
            outs = [p.communicate(timeout=timeout) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            tails = [f"process {i}: {p.communicate()[1][-1500:]}" for i, p in enumerate(procs)]
            pytest.fail(f"the {n}-process run did not finish in {timeout} s\n" + "\n".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


@pytest.mark.parametrize("problem", ["foreign_checkpoints", "metrics_unwritable"])
def test_an_error_on_process_0_stops_every_process(tmp_path, problem):
    """Only process 0 opens the workdir and writes the records. When it refuses one (checkpoints
    of another model), or fails to start its metrics after the state is initialised (a directory
    where metrics.jsonl goes), the other process stops too, at once and with one line, instead of
    waiting in its first collective until the distributed runtime's timeout."""
    if problem == "foreign_checkpoints":
        (tmp_path / "checkpoints" / "5").mkdir(parents=True)
        (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "resnet18"}}))
        needle = "holds checkpoints of a different run"
    else:
        (tmp_path / "metrics.jsonl").mkdir()
        needle = f"cannot write {tmp_path / 'metrics.jsonl'} (Is a directory); move it away"
    results = run_processes([*SHORT, f"--workdir={tmp_path}"], timeout=120)
    for i, (rc, err) in enumerate(results):
        assert rc == 2 and "Traceback" not in err, (i, err[-3000:])
        assert err.strip().splitlines()[-1].startswith("error: "), (i, err[-3000:])
    assert needle in results[0][1]
    assert "process 0 could not start" in results[1][1]
    if problem == "foreign_checkpoints":
        assert os.listdir(tmp_path / "checkpoints") == ["5"]  # nothing written


def test_a_logged_row_averages_the_steps_since_the_last(single_run, tmp_path):
    """With log_every_steps=3 the row of step 3 (and of step 6) holds the mean of the per-step
    train/loss and train/top1_acc of steps 1-3 (4-6), which the reference run logged one by one."""
    from resnet_jax.cli import experiment_config
    from resnet_jax.train import train_and_evaluate

    flags = [f for f in SHORT[1:] if not f.startswith("--config.log_every_steps")]
    config = experiment_config(os.path.join(ROOT, "experiments/digits.py"), *flags, "--config.log_every_steps=3")
    train_and_evaluate(config, str(tmp_path))
    every = {r["step"]: r for r in read_metrics(single_run) if "train/loss" in r}
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "train/loss" in r}
    assert sorted(rows) == [3, 6]
    for end in (3, 6):
        for key in ("train/loss", "train/top1_acc"):
            want = np.mean([every[s][key] for s in range(end - 2, end + 1)])
            assert rows[end][key] == pytest.approx(want, rel=1e-4, abs=1e-6), (end, key)


def test_one_step_on_imagenet_built_by_tfds(imagenet_data_dir, tmp_path):
    """The real imagenet2012 builder's output (prepared from tiny generated tars) trains a step
    with paper 1's scale and colour augmentation and evaluates; evaluate then tests the step on
    crops of another size and keeps that result beside the run's own."""
    from resnet_jax.config import get_base_config
    from resnet_jax.train import train_and_evaluate

    data_dir, manual_dir = imagenet_data_dir
    c = get_base_config()
    c.model.name, c.model.width = "resnet18", 4
    c.dataset.name, c.dataset.data_dir, c.dataset.manual_dir, c.dataset.image_size = (
        "imagenet2012",
        data_dir,
        manual_dir,
        32,
    )
    c.dataset.train_augment, c.dataset.lighting_std = "scale", 0.1
    c.batch_size, c.num_steps, c.log_every_steps, c.progress_bar = 2, 1, 1, False
    final = train_and_evaluate(c, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert np.isfinite([r["train/loss"] for r in rows if "train/loss" in r]).all()
    assert set(final) == {"eval/loss", "eval/top1_acc", "eval/top5_acc"} and np.isfinite(final["eval/loss"])
    assert os.listdir(tmp_path / "checkpoints") == ["1"]

    def evaluate(*flags):
        p = run_cli("resnet_jax.evaluate", f"--workdir={tmp_path}", *flags)
        assert p.returncode == 0, p.stderr[-3000:]
        return sorted(f for f in os.listdir(tmp_path) if f.startswith("eval_"))

    assert evaluate("--eval_image_size=48") == ["eval_1_48px.json"]
    result = json.loads((tmp_path / "eval_1_48px.json").read_text())
    assert result["step"] == 1 and np.isfinite(result["eval/loss"]) and not (tmp_path / "eval_1.json").exists()
    assert abs(result["eval/loss"] - final["eval/loss"]) > 1e-6  # tested on 48px crops, not the run's 32px

    # Each protocol's result has its own file, so that none replaces another's: the run's own size
    # is no other size, 10 crops are named so, and a run configured for 10-crop testing tests so.
    assert evaluate("--eval_image_size=32", "--eval_crops=10") == ["eval_1_10crop.json", "eval_1_48px.json"]
    (tmp_path / "eval_1_10crop.json").unlink()
    run_config = json.loads((tmp_path / "config.json").read_text())
    run_config["dataset"]["eval_crops"] = 10
    (tmp_path / "config.json").write_text(json.dumps(run_config))
    assert evaluate() == ["eval_1_10crop.json", "eval_1_48px.json"]
    # The run's own side is no other size: 224 when image_size is unset, as in every ImageNet config.
    from resnet_jax.workdir import other_size

    assert other_size({"image_size": 32}, 48) == 48 and other_size({"image_size": 32}, 32) is None
    assert other_size({}, 224) is None and other_size({}, 320) == 320 and other_size({}, None) is None
    assert other_size({"image_size": 32, "eval_image_size": 48}, 48) is None


def test_a_resume_on_another_number_of_processes_warns_for_sharded_datasets(tmp_path, caplog):
    """CIFAR and ImageNet hosts read shares fixed by the process count: a resume on another count
    is warned of (digits gives the same batches on any count: no warning)."""
    from resnet_jax import data
    from resnet_jax.config import get_base_config
    from resnet_jax.schedules import Durations
    from resnet_jax.train import _record_start
    from resnet_jax.workdir import Workdir

    info = data.get_info({"name": "digits"})
    for name, warned in (("cifar10", True), ("digits", False)):
        c = get_base_config()
        c.dataset.name = name
        (tmp_path / "run_info.json").write_text(json.dumps({"processes": 4}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="resnet_jax"):
            _record_start(c, Workdir(tmp_path), None, info, Durations.from_config(c, info.num_train), step=5)
        found = [r.getMessage() for r in caplog.records if "resuming on 1 processes" in r.getMessage()]
        assert found == (
            [
                f"resuming on 1 processes, the run's last start had 4: each reads another share of {name}, "
                "so the rest of this epoch repeats or skips some examples"
            ]
            if warned
            else []
        ), name
        assert json.loads((tmp_path / "run_info.json").read_text())["processes"] == 1
