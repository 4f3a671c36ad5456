"""The benchmark harness: the CLI's JSON line, the Linen baseline's architecture, the input-pipeline
mode and one-line errors. Tiny sizes only: the real measurements are in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_env import user_env

from resnet_jax import bench
from resnet_jax.summary import abstract_model, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = user_env()
    return subprocess.run(
        [sys.executable, "-m", "resnet_jax.bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_json_line():
    """--json ends the output with one parsable line holding the required, positive numbers.

    --xla_gpu_flags is passed too: XLA aborts on unknown XLA_FLAGS, so this checks that the GPU
    flags are known to this jaxlib (they are inert on the CPU)."""
    p = run_bench(
        "--model=cifar_resnet8",
        "--batch_size=8",
        "--image_size=16",
        "--steps=3",
        "--warmup=1",
        "--xla_gpu_flags",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert (out["model"], out["batch_size"], out["image_size"]) == ("cifar_resnet8", 8, 16)
    for key in ("train_img_per_s", "eval_img_per_s", "compile_s", "peak_mem_bytes", "flops_per_step"):
        assert isinstance(out[key], int | float) and out[key] > 0, key
    # count_macs of a CIFAR ResNet-8 at 16x16 (3 stages of one basic block, 16/32/64 channels).
    assert out["forward_macs_per_image"] > 1e6
    assert out["flops_per_step"] == 3 * 2 * 8 * out["forward_macs_per_image"]
    assert out["mfu"] is None  # no known peak for a CPU
    assert "device" in out and len(out["train_step_ms_all"]) == 3
    # img/s is the batch over the median step time, of the steps it reports.
    assert out["train_step_ms"] == pytest.approx(statistics.median(out["train_step_ms_all"]), abs=2e-3)
    assert out["train_img_per_s"] == pytest.approx(8e3 / out["train_step_ms"])
    assert bench.DEFAULT_XLA_GPU_FLAGS in out["xla_flags"]


def test_fed_by_the_input_pipeline_with_a_space_to_depth_stem():
    """--input_fed: the same compiled step fed uint8 batches by the ImageNet-style tf.data pipeline
    (generated JPEGs) through prefetch; --s2d_stem under the Trainer's batch sharding over 2 devices;
    --width (a narrow resnet18; the test's time is TensorFlow and the compile, not the width);
    --xla_flags (LLVM -O1 here: the resnet18 step's -O3 compile is 14 of the test's 40 s)."""
    p = run_bench(
        "--model=resnet18",
        "--xla_flags=--xla_backend_optimization_level=1",
        "--width=8",
        "--image_size=32",
        "--batch_size=4",
        "--devices=2",
        "--steps=2",
        "--warmup=1",
        "--s2d_stem",
        "--input_fed",
        "--ip_images=6",
        "--no_eval",
        "--peak_tflops=0.5",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["space_to_depth_stem"] is True and out["devices"] == 2 and out["width"] == 8
    # --peak_tflops is per device: MFU is the achieved FLOP/s over the peak of both devices.
    assert out["peak_tflops"] == 1.0 and out["mfu"] == pytest.approx(out["achieved_tflops"] / 1.0)
    assert out["xla_flags"].split() == [
        "--xla_force_host_platform_device_count=2",
        "--xla_backend_optimization_level=1",
    ]
    assert out["forward_macs_per_image"] < 37e6 / 20  # resnet18 at 32px: 37M MACs at width 64
    assert out["fed_input"].startswith("imagenet")
    for key in ("train_img_per_s", "pipeline_img_per_s", "fed_img_per_s", "fed_vs_synthetic"):
        assert out[key] > 0, key
    table = bench.markdown([out])
    assert "space_to_depth_stem" in table and "width=8" in table and "fed by the pipeline" in table


def test_input_fed_needs_cifar_size():
    p = run_bench("--model=cifar_resnet8", "--image_size=16", "--input_fed", timeout=120)
    assert p.returncode == 2 and "--image_size=32" in p.stderr and "Traceback" not in p.stderr


def test_bad_model_name_is_one_line():
    p = run_bench("--model=resnet19", "--json", timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "depth 19" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not p.stdout.strip()


def test_bad_option_is_one_line():
    p = run_bench("--model=cifar_resnet8", "--steps=-1", timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    # torchvision's ResNets have no base-width option: a narrow comparison must leave torch out.
    p = run_bench("--model=resnet18", "--width=8", "--compare", timeout=120)
    assert p.returncode == 2 and "--no_torch" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--input_pipeline", "--ip_images=0"], ["--ip_images=0"]),
        (["--input_pipeline", "--ip_image_size=0"], ["--ip_image_size=0"]),
        (["--input_pipeline", "--ip_batches=0"], ["--ip_batches=0"]),
        (["--devices=100000"], ["--devices=100000", "at most 1024"]),
        (["--remat_compare", "--compare"], ["--remat_compare", "--compare"]),
        (["--bn_compare", "--input_pipeline"], ["--input_pipeline", "--bn_compare"]),
        (["--markdown", "x.jsonl", "--sweep=smoke"], ["--markdown", "--sweep"]),
        (["--model=resnet18", "--s2d_stem", "--image_size=33"], ["--s2d_stem needs an even --image_size"]),
        (["--bn_compare", "--devices=1"], ["global BN with itself", "--devices"]),
        (["--bn_compare", "--batch_size=8", "--bn_group_size=8"], ["global BN with itself", "--bn_group_size=8"]),
        (["--xla_flags=garbage"], ["--xla_flags=garbage", "'garbage' is not an XLA flag"]),
        (["--xla_flags=--xla_nonexistent_flag=1"], ["XLA refused them", "Unknown flag"]),
        # (--xla_gpu_flags was not checked: XLA's fatal log line, exit 1)
        (["--xla_gpu_flags=garbage"], ["--xla_gpu_flags=garbage", "'garbage' is not an XLA flag"]),
        (["--xla_gpu_flags=--xla_nonexistent_flag=1"], ["XLA refused them", "Unknown flag"]),
    ],
)
def test_bad_arguments_are_one_line_before_any_compile(capsys, monkeypatch, argv, needles):
    """Before: tracebacks, a hang (--devices), exit 0 with a meaningless or mislabelled measurement
    (--ip_batches=0, --s2d_stem at an odd size, BN compared with itself, a mode silently ignored),
    XLA's fatal log line (--xla_flags, now checked in a short child process first)."""
    for k in ("XLA_FLAGS", "JAX_PLATFORMS"):  # restored even if a case got as far as prepare_environment
        monkeypatch.setenv(k, os.environ.get(k, ""))
    env = {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    assert bench.main(["--model=cifar_resnet8", "--batch_size=8", *argv]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(n in lines[0] for n in needles), lines[0]
    assert captured.out == "" and {k: os.environ.get(k) for k in env} == env  # failed before touching them


def test_input_pipeline_mode():
    p = run_bench(
        "--input_pipeline", "--ip_images=4", "--ip_batches=1", "--ip_batch_size=2", "--ip_image_size=32", "--json"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["cpu_cores"] >= 1
    for name in ("digits", "cifar", "imagenet", "imagenet_scale"):
        assert out[f"{name}_img_per_s"] > 0 and out[f"{name}_img_per_s_per_core"] > 0, name


@pytest.fixture(scope="module")
def linen():
    module = bench.load_benchmark_module("linen_resnet")
    assert module is not None
    return module


@pytest.mark.parametrize(
    "name, num_classes, size",
    [("resnet18", 1000, 224), ("resnet50", 1000, 224), ("cifar_resnet20", 10, 32), ("cifar_resnet56", 100, 32)],
)
def test_linen_baseline_is_the_same_architecture(linen, name, num_classes, size):
    """Same parameter count as our model (and as torchvision: 11,689,512 / 25,557,032)."""
    model = linen.create_model(name, num_classes=num_classes)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, size, size, 3)), train=False))
    assert linen.count_params(variables) == count_params(abstract_model(name, num_classes=num_classes))
    if name == "resnet18":
        assert linen.count_params(variables) == 11_689_512


def _tiny_imagenet_layout(linen):
    # The ImageNet stem, a bottleneck stage and a strided one with projection shortcuts; a full
    # ResNet-18/50 step takes a minute to compile on a busy 2-core CPU (the layouts are checked
    # above by parameter count).
    return linen.ResNet(stage_sizes=(1, 1), block_cls=linen.BottleneckResNetBlock, num_classes=10, num_filters=4)


@pytest.mark.parametrize("layout, size", [("cifar_resnet8", 16), ("imagenet", 32)])
def test_linen_baseline_trains(linen, layout, size):
    if layout == "imagenet":
        model = _tiny_imagenet_layout(linen)
    else:
        model = linen.create_model(layout, num_classes=10, width=4)
    state = linen.create_train_state(model, size, rng=jax.random.key(0, impl="rbg"))
    before = jax.tree.map(np.asarray, state.batch_stats)
    params_before = jax.tree.map(np.array, state.params)  # copies: the step donates the state
    step = linen.make_train_step(10)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(4, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
    }
    for _ in range(2):
        state, metrics = step(state, batch)
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.tree.map(np.asarray, state.batch_stats))
    assert any(jax.tree.leaves(changed))
    # Every parameter moved in two SGD steps. The L2 decay alone moves the non-zero ones; the
    # biases and the blocks' last BN scales start at zero, so only a gradient moves those.
    params_after = jax.tree.map(np.asarray, state.params)
    assert jax.tree.structure(params_after) == jax.tree.structure(params_before)
    flat = jax.tree_util.tree_flatten_with_path(params_before)[0]
    unchanged = [
        jax.tree_util.keystr(p)
        for (p, a), b in zip(flat, jax.tree.leaves(params_after), strict=True)
        if np.array_equal(a, b)
    ]
    assert not unchanged, unchanged
    assert sum(not a.any() for _, a in flat) >= 3  # fc bias, BN biases and zero scales among them


def test_linen_baseline_rejects_unknown_layouts(linen):
    with pytest.raises(ValueError, match="no model"):
        linen.create_model("cifar_resnet21", num_classes=10)


def test_peak_table_and_markdown():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", True) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", True) == 756.0
    assert bench.peak_tflops("NVIDIA H100 NVL", True) == 835.0  # (not the SXM row)
    assert bench.peak_tflops("TPU v3", True) == 61.5  # per TensorCore: a v3 chip is two JAX devices
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", False) == 156.0
    assert bench.peak_tflops("cpu", True) is None
    row = dict(
        model="resnet18",
        image_size=112,
        batch_size=32,
        half_precision=False,
        train_img_per_s=40.0,
        linen_train_img_per_s=36.0,
        ratio_vs_linen=40 / 36,
        torch_train_img_per_s=None,
        eval_img_per_s=100.0,
        compile_s=5.0,
        linen_compile_s=4.0,
        peak_mem_bytes=2**30,
        mfu=None,
    )
    table = bench.markdown([row, {"error": "exit status 1", "args": ["--model=x"]}])
    assert "| resnet18 | 112 | 32 | fp32 | defaults | 40.0 | 36.0 | 1.11 (n/a; n/a) | n/a |" in table
    assert "failed: --model=x" in table
    flagged = dict(row, xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true", bn_group_size=32)
    assert "| `--xla_gpu_enable_latency_hiding_scheduler=true`, bn_group_size=32 | 40.0 |" in bench.markdown([flagged])


def test_markdown_of_saved_results(tmp_path, capsys):
    """--markdown renders the JSON lines that --json runs left (other lines skipped); a missing
    or JSON-less file is a one-line error with exit status 2."""
    row = {"model": "resnet50", "image_size": 224, "batch_size": 256, "half_precision": True}
    row.update(train_img_per_s=5000.0, compile_s=20.0, peak_mem_bytes=2**33)
    saved = tmp_path / "speed.jsonl"
    saved.write_text("a log line\n" + json.dumps(row) + "\n")
    assert bench.main(["--markdown", str(saved)]) == 0
    assert "| resnet50 | 224 | 256 | bf16 | defaults | 5,000.0 |" in capsys.readouterr().out
    # A saved --sweep --json line holds its runs' results; a line with a wrong-typed key is one line.
    (tmp_path / "sweep.jsonl").write_text(json.dumps({"mode": "sweep", "results": [row, {**row, "batch_size": 128}]}))
    assert bench.main(["--markdown", str(tmp_path / "sweep.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "| resnet50 | 224 | 256 |" in out and "| resnet50 | 224 | 128 |" in out
    (tmp_path / "typed.jsonl").write_text(json.dumps({**row, "xla_flags": 5}))
    assert bench.main(["--markdown", str(tmp_path / "typed.jsonl")]) == 2
    assert "is not a complete bench result" in capsys.readouterr().err
    for bad in (tmp_path / "missing.jsonl", tmp_path / "empty.jsonl"):
        if bad.name == "empty.jsonl":
            bad.write_text("no results here\n")
        assert bench.main(["--markdown", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def test_child_processes_measure_the_same_network_on_the_same_devices():
    """--remat_compare's children got neither --width nor --devices: both measured the default
    width on one device."""
    args = bench.build_parser().parse_args(["--model=cifar_resnet8", "--width=4", "--devices=2", "--devices_note=x"])
    passed = bench.passthrough_args(args)
    assert {"--width=4", "--devices=2", "--devices_note=x"} <= set(passed)
    assert not any(
        a.startswith(("--width", "--devices")) for a in bench.passthrough_args(bench.build_parser().parse_args([]))
    )


def test_options_the_references_lack_are_named():
    """--compare with remat, grouped BN or stacked blocks compares other work: the JSON says so."""
    parse = bench.build_parser().parse_args
    assert bench.options_not_in_references(parse(["--s2d_stem"])) == []  # the same function
    argv = ["--remat", "--bn_group_size=4", "--scan_blocks=true"]
    assert bench.options_not_in_references(parse(argv)) == ["remat", "bn_group_size", "scan_blocks"]


def test_saved_residual_bytes():
    """The bytes autodiff keeps for the backward pass, and how jax.checkpoint reduces them."""

    def f(x):
        return jnp.sum(jnp.sin(jnp.sin(jnp.sin(x))))

    x = jnp.ones((1000,), jnp.float32)
    plain = bench.saved_residual_bytes(f, x)
    remat = bench.saved_residual_bytes(jax.checkpoint(f), x)
    assert plain >= 3 * 4000 and remat == 4000  # cos of each sin's input vs the input alone


def test_speedups_say_how_much_faster_ours_is_and_img_per_s_uses_the_median():
    """speedups(label, ref) > 1 when label's steps are shorter (here 2x in every repeat and by
    CPU time); img/s is the batch over the median step, not the mean or the fastest."""
    t = bench.Timings(
        wall={"ours": [1.0, 1.0, 1.0], "ref": [2.0, 2.0, 2.0]},
        cpu={"ours": [1.5, 1.5], "ref": [3.0, 3.0]},
        per_repeat=[{"ours": 1.0, "ref": 2.0}, {"ours": 1.0, "ref": 2.0}],
    )
    sp = t.speedups("ours", "ref")
    assert (sp["ratio"], sp["paired"], sp["cpu"], sp["per_repeat"]) == (2.0, 2.0, 2.0, [2.0, 2.0])
    assert t.img_per_s("ref", 8) == 4.0
    assert bench.median_img_per_s([1.0, 2.0, 10.0], 4) == 2.0 and bench.median_img_per_s([], 4) is None
