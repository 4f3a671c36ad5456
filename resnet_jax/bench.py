"""Benchmarks of the real train step: throughput, compile time, memory, MFU, and side-by-side references.

    python -m resnet_jax.bench --model NAME --batch_size N [--image_size S] [--half_precision]
        [--steps K] [--warmup W] [--repeats R] [--remat] [--bn_group_size G] [--s2d_stem] [--width C] [--json]
        [--compare] [--no_torch] [--remat_compare] [--bn_compare --devices 8] [--input_fed]
        [--xla_gpu_flags [FLAGS]] [--xla_flags FLAGS] [--peak_tflops T] [--devices_note [TEXT]]
    python -m resnet_jax.bench --input_pipeline [--cores C]
    python -m resnet_jax.bench --sweep cpu|smoke      (GPU: benchmarks/gpu_runs.sh)
    python -m resnet_jax.bench --markdown RESULTS.jsonl...   (tables of saved --json results)

What is timed is ``Trainer(config, info, durations).train_step`` of ``resnet_jax.train`` (the jitted,
sharded, state-donating step a training run uses), compiled once with ``lower(...).compile()``
(the compile time) on a synthetic batch made directly on the devices (no input pipeline, no
host-to-device copy). Each timed step blocks until its outputs are ready; throughput is the batch
size over the *median* step time of ``steps x repeats`` steps after ``warmup`` steps.

* eval: the jitted ``eval_step`` on the same batch.
* memory: ``peak_bytes_in_use`` of the devices on GPU/TPU; on the CPU the peak RSS of the process
  (``resource.getrusage``, compilation included), plus XLA's own buffer plan of the compiled step
  (``xla_temp_bytes``: activations and other temporaries; ``xla_argument_bytes``: state + batch).
* MFU: FLOPs per step = 3 x forward MACs x 2 x batch (``resnet_jax.summary.count_macs``) over the
  step time, against the device's dense peak (``PEAK_TFLOPS``, or ``--peak_tflops``).
* ``--compare``: in the same process and interleaved (repeat by repeat, alternating the order, so
  a noisy machine slows every contender alike), the Flax Linen baseline of the same architecture
  (``benchmarks/linen_resnet.py``) and, when torch is installed, PyTorch eager with channels_last
  (``benchmarks/torch_resnet.py``); reports their throughput and the ratios.
* ``--remat_compare``: the same run with and without ``model.remat``, each in its own process so
  that the peak memories do not mix; reports the memory saved and the throughput cost, and the
  bytes autodiff keeps for the backward pass (``residual_bytes``, what remat changes before XLA
  schedules the buffers; ``--residuals`` adds it to any run). On XLA:CPU pass
  ``--xla_flags=--xla_cpu_enable_concurrency_optimized_scheduler=false`` for its memory-minimising
  scheduler (the default one keeps more buffers alive, with or without remat).
* ``--bn_compare``: global (synchronised) BatchNorm vs ``bn_group_size`` statistics, interleaved,
  on ``--devices`` simulated CPU devices (``--xla_force_host_platform_device_count``).
* ``--input_fed``: also the train step fed by the tf.data training augmentation of generated
  images (CIFAR-style PNGs or 500x375 JPEGs) through ``resnet_jax.data.prefetch``, as ``train.py``
  feeds it, against the same step on a batch already on the devices; and that pipeline alone.
* ``--input_pipeline``: the input pipelines on their own, img/s and img/s per CPU core: digits
  (numpy), CIFAR (generated 32x32 PNGs) and ImageNet (generated 500x375 JPEGs) through the
  tf.data augmentation of ``resnet_jax.data.augment``: the ImageNet JPEGs through both recipes
  (Inception crops, and paper 1's scale and colour augmentation).
* ``--sweep``: a predefined list of the above, each in its own process, as markdown tables.

With ``--json`` the last line of the output is one JSON object with the results. GPU-ready:
``--half_precision`` (bf16 compute, float32 parameters and BN statistics), NHWC, the state donated,
and ``--xla_gpu_flags`` sets the XLA GPU flags of ``DEFAULT_XLA_GPU_FLAGS`` before JAX starts.
JAX is imported only after the flags and the environment are set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from resnet_jax import cli
from resnet_jax.errors import UserError, first_line

# Overlap the gradient all-reduce with the backward pass (shared/reference/performance.md). CUDA
# graphs (--xla_gpu_enable_command_buffer) and autotuning are left at XLA's defaults.
DEFAULT_XLA_GPU_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"

# Dense peak TFLOP/s per device: (substring of ``device.device_kind``, bf16/fp16, float32 as XLA
# runs it by default (TF32 tensor cores on Ampere and later; bf16 passes on TPUs)). First match wins.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),  # SXM
    ("H200", 989.0, 494.0),
    ("GH200", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A10G", 70.0, 35.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
    ("V100", 125.0, 15.7),  # fp16 tensor cores; V100 has no bf16 units
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5e", 197.0, 197.0),
    ("TPU v4", 275.0, 275.0),
    # TPU v2/v3 chips have two TensorCores, each a JAX device of its own: half the chip's peak.
    ("TPU v3", 61.5, 61.5),
    ("TPU v2", 22.5, 22.5),
)

# XLA:CPU's default (concurrency-optimised) scheduler starts independent work early, which keeps
# more activations alive and undoes rematerialisation; this flag selects its memory-minimising one.
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# --sweep: each entry is one `python -m resnet_jax.bench ... --json` process.
SWEEPS: dict[str, list[list[str]]] = {
    "cpu": [
        ["--model=resnet18", "--image_size=112", "--batch_size=32", "--compare", "--steps=3", "--repeats=8"],
        ["--model=cifar_resnet56", "--batch_size=128", "--compare", "--steps=2", "--repeats=8"],
        ["--model=cifar_resnet110", "--batch_size=8", "--steps=0"],
        ["--model=cifar_resnet1202", "--batch_size=8", "--steps=0"],
        ["--model=cifar_resnet110", "--batch_size=128", "--remat_compare", "--steps=3"],
        [
            "--model=cifar_resnet110",
            "--batch_size=128",
            "--remat_compare",
            "--steps=3",
            f"--xla_flags={CPU_MEMORY_SCHEDULER}",
        ],
        ["--model=cifar_resnet20", "--batch_size=128", "--bn_compare", "--devices=8", "--steps=5", "--repeats=5"],
        ["--input_pipeline", "--cores=1"],
        ["--input_pipeline"],
    ],
    # The GPU runs are benchmarks/gpu_runs.sh (groups that each fit a 10-minute window).
    # A seconds-long check that every mode works (tiny sizes).
    "smoke": [
        ["--model=cifar_resnet8", "--image_size=16", "--batch_size=8", "--compare", "--steps=2", "--repeats=2"],
        ["--model=cifar_resnet8", "--image_size=16", "--batch_size=8", "--steps=0"],
        ["--model=cifar_resnet8", "--image_size=16", "--batch_size=8", "--remat_compare", "--steps=2"],
        ["--model=cifar_resnet8", "--image_size=16", "--batch_size=8", "--bn_compare", "--devices=2", "--steps=2"],
        ["--input_pipeline", "--ip_images=8", "--ip_batches=2", "--ip_batch_size=4", "--ip_image_size=32"],
    ],
}


class BenchError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- environment (before JAX starts) ----------------------------------------------------------


def use_fast_prng() -> None:
    """The ``rbg`` PRNG for this process: the train and eval steps draw no random numbers, so this only
    changes the initial values and the synthetic batch, whose threefry initialisers otherwise take
    seconds to compile on the CPU (6 s for a CIFAR ResNet-8's init, 1.5 s with rbg)."""
    import jax

    jax.config.update("jax_default_prng_impl", "rbg")


def planned_xla_flags(args: argparse.Namespace) -> list[str]:
    """The XLA_FLAGS that ``prepare_environment`` sets: the environment's, plus those of ``args``."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if args.devices:
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={args.devices}")
    if args.xla_gpu_flags:
        flags += args.xla_gpu_flags.split()
    if args.xla_flags:
        flags += args.xla_flags.split()
    return flags


def check_xla_flags(args: argparse.Namespace, timeout: float = 60.0) -> None:
    """With ``--xla_flags``: starts JAX's backend with the XLA_FLAGS this run would set in a short
    child process, so that flags XLA refuses (it aborts the process with a fatal log line) become
    one ``error:`` line here. A child that hangs or fails without such a line lets the run go on."""
    if not (args.xla_flags or args.xla_gpu_flags):
        return
    env = dict(os.environ, XLA_FLAGS=" ".join(planned_xla_flags(args)), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.devices:
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        p = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices()"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        log(f"warning: could not check --xla_flags within {timeout:.0f} s; going on")
        return
    if p.returncode == 0:
        return
    # glog's fatal line: "F1203 16:26:37.424162    8548 parse_flags_from_env.cc:171] <message>"
    fatal = [m.group(1) for m in re.finditer(r"^F\d{4} [^\]]*\] (.*)$", p.stderr, re.MULTILINE)]
    if fatal:
        raise BenchError(f"--xla_flags={args.xla_flags}: XLA refused them ({fatal[-1].strip()})")


def prepare_environment(args: argparse.Namespace) -> None:
    """Sets XLA flags, simulated devices and the CPU affinity; must run before JAX's backends start."""
    flags = planned_xla_flags(args)
    if args.devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
    if args.compare and not args.no_torch:
        # On a GPU, JAX would otherwise take 75% of its memory up front and leave torch too little;
        # peak_bytes_in_use is unaffected.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.cores:
        available = sorted(os.sched_getaffinity(0))
        if args.cores > len(available):
            raise BenchError(f"--cores={args.cores}, but only {len(available)} CPU cores are available")
        os.sched_setaffinity(0, available[: args.cores])
    if "jax" in sys.modules and (args.devices or args.xla_gpu_flags or args.xla_flags):
        log("warning: jax was imported before the XLA flags were set; they apply only if no backend started yet")


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0))


# --- measurements -----------------------------------------------------------------------------


def peak_tflops(device_kind: str, half_precision: bool) -> float | None:
    """The dense peak of one device of this kind, or None if unknown (e.g. CPUs)."""
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return bf16 if half_precision else fp32
    return None


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): devices' peak_bytes_in_use, else the process's peak RSS."""
    import jax

    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "device peak_bytes_in_use (max over devices)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS (getrusage)"


def describe_devices() -> str:
    import jax

    d = jax.devices()
    return f"{d[0].platform}:{d[0].device_kind} x{len(d)}"


def default_image_size(model: str) -> int:
    return 32 if model.startswith("cifar") else 224


def default_num_classes(model: str) -> int:
    return 10 if model.startswith("cifar") else 1000


def bench_config(args: argparse.Namespace, *, remat: bool | None = None, bn_group_size: Any = "args"):
    """The base config with the benchmark's model, batch and synthetic dataset."""
    from resnet_jax.config import get_base_config

    c = get_base_config()
    c.model.name = args.model
    c.model.remat = args.remat if remat is None else remat
    c.model.bn_group_size = args.bn_group_size if bn_group_size == "args" else bn_group_size
    c.model.scan_blocks = args.scan_blocks
    c.model.space_to_depth_stem = args.s2d_stem
    c.model.width = args.width
    c.dataset.name = "synthetic"
    c.dataset.image_size = args.image_size
    c.dataset.num_classes = args.num_classes
    c.batch_size = args.batch_size
    c.num_steps = 1_000_000
    c.half_precision = args.half_precision
    c.progress_bar = False
    c.seed = args.seed
    return c


def forward_macs(config, image_size: int) -> tuple[int | None, str]:
    """Forward MACs per image from resnet_jax.summary (None if that module is unavailable)."""
    try:
        from resnet_jax.config import model_options
        from resnet_jax.summary import abstract_model, count_macs
    except ImportError:
        return None, "unavailable"
    model = abstract_model(config.model.name, num_classes=config.dataset.num_classes, **model_options(config))
    return count_macs(model, image_size), "resnet_jax.summary.count_macs"


def median_img_per_s(times: Sequence[float], batch_size: int) -> float | None:
    return batch_size / statistics.median(times) if times else None


class OurStep:
    """``Trainer.train_step`` (and ``eval_step``) of resnet_jax, compiled once on a device batch."""

    def __init__(self, args: argparse.Namespace, *, label: str = "ours", **config_overrides):
        import jax
        import numpy as np

        from resnet_jax import data
        from resnet_jax.schedules import Durations
        from resnet_jax.train import Trainer

        self.label = label
        self.config = bench_config(args, **config_overrides)
        info = data.get_info(self.config.dataset)
        self.trainer = Trainer(self.config, info, Durations.from_config(self.config, info.num_train))
        self.batch = data.synthetic_global_batch(
            self.config.dataset, args.batch_size, self.trainer.batch_sharding, seed=args.seed
        )
        self.state = self.trainer.init_state()
        jax.block_until_ready((self.state, self.batch))
        t0 = time.perf_counter()
        try:
            lowered = self.trainer.train_step.lower(self.state, self.batch)
        except ValueError as e:  # e.g. a batch not divisible by bn_group_size, found while tracing
            raise BenchError(first_line(e)) from None
        self.trace_s = time.perf_counter() - t0
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.memory_analysis = self.compiled.memory_analysis()
        self._eval = None
        mask = np.ones((args.batch_size,), np.float32)
        self.eval_batch = dict(self.batch, mask=jax.device_put(mask, self.trainer.batch_sharding))

    def step(self) -> None:
        import jax

        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))

    def eval_times(self, steps: int, warmup: int) -> tuple[list[float], float]:
        """Per-step seconds of the eval step and its compile time."""
        import jax

        from resnet_jax.train import zero_eval_sums

        totals = jax.device_put(zero_eval_sums(), self.trainer.replicated)
        t0 = time.perf_counter()
        compiled = self.trainer.eval_step.lower(self.state, self.eval_batch, totals).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            totals = jax.block_until_ready(compiled(self.state, self.eval_batch, totals))
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return times, compile_s


_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1}


def residual_bytes(ours: OurStep) -> int:
    """Bytes of the values JAX's autodiff keeps from the forward pass for the backward pass of the
    loss (``jax.ad_checkpoint.print_saved_residuals``; parameters included). This is what ``remat``
    changes at the JAX level, before XLA schedules and assigns the buffers."""
    from flax import nnx

    from resnet_jax import data

    t = ours.trainer
    images = data.model_input(ours.batch["image"], t.info.pixels)

    def loss(params):
        model = nnx.merge(t.graphdef_train, params, ours.state["batch_stats"], copy=True)
        return model(images).sum()

    return saved_residual_bytes(loss, ours.state["params"])


def saved_residual_bytes(fn: Callable, *args: Any) -> int:
    """Total bytes of ``jax.ad_checkpoint.print_saved_residuals(fn, *args)``."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    total = 0
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*(\w+)\[([^\]]*)\]", line)  # e.g. f32[16@data,32,32,16] (sharded dims: @axis)
        if m and m.group(1) in _ITEMSIZE:
            dims = [int(d.split("@")[0]) for d in m.group(2).split(",") if d]
            total += _ITEMSIZE[m.group(1)] * math.prod(dims)
    return total


def load_benchmark_module(name: str):
    """``benchmarks/<name>.py`` (not part of the installed package), or None if it is not there."""
    import importlib.util

    path = BENCHMARKS / f"{name}.py"
    if not path.exists():
        return None
    key = f"resnet_jax_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # flax's dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


class LinenStep:
    """The Flax Linen baseline (benchmarks/linen_resnet.py) on the same device batch as ``ours``,
    jitted as the Flax ImageNet example jits it (``compiler_options`` only for A/B studies)."""

    def __init__(
        self, args: argparse.Namespace, ours: OurStep, *, compiler_options: dict | None = None, label: str = "linen"
    ):
        import jax
        import jax.numpy as jnp

        from resnet_jax import data

        self.label = label
        linen = load_benchmark_module("linen_resnet")
        if linen is None:
            raise BenchError(f"{BENCHMARKS / 'linen_resnet.py'} not found")
        dtype = jnp.bfloat16 if args.half_precision else jnp.float32
        self.model = linen.create_model(args.model, num_classes=args.num_classes, dtype=dtype, width=args.width)
        state = linen.create_train_state(self.model, args.image_size, seed=args.seed)
        self.params = linen.count_params({"params": state.params})
        self.state = jax.device_put(state, ours.trainer.replicated)
        # Float images, normalised beforehand: the Flax ImageNet example normalises on the host.
        images = jax.jit(data.model_input, static_argnums=1)(ours.batch["image"], ours.trainer.info.pixels)
        self.batch = {"image": images, "label": ours.batch["label"]}
        t0 = time.perf_counter()
        lowered = linen.make_train_step(args.num_classes).lower(self.state, self.batch)
        self.compiled = lowered.compile(compiler_options=compiler_options)
        self.compile_s = time.perf_counter() - t0

    def step(self) -> None:
        import jax

        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))


class TorchStep:
    """PyTorch eager, channels_last (benchmarks/torch_resnet.py)."""

    label = "torch"
    extra_warmup = 3  # oneDNN builds its kernels over the first few eager steps

    def __init__(self, args: argparse.Namespace):
        module = load_benchmark_module("torch_resnet")
        self.trainer = module.TorchTrainer(
            args.model,
            num_classes=args.num_classes,
            batch_size=args.batch_size,
            image_size=args.image_size,
            half_precision=args.half_precision,
        )
        self.compile_s = 0.0

    def step(self) -> None:
        self.trainer.step()


@dataclasses.dataclass
class Timings:
    """Per-step wall-clock and process-CPU seconds by runner label, and per-repeat medians."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    per_repeat: list[dict[str, float]]  # median wall seconds of each runner, per repeat

    def img_per_s(self, label: str, batch_size: int) -> float:
        return batch_size / statistics.median(self.wall[label])

    def speedups(self, label: str, ref: str) -> dict[str, Any]:
        """How much faster ``label`` is than ``ref`` (> 1: faster), three ways.

        ``ratio``: of the median step times over all repeats; ``paired``: the median over repeats
        of the ratio within each repeat (robust to load that drifts between repeats); ``cpu``: of
        the median process CPU time per step (robust to other processes taking the cores, though
        not to their use of caches and memory bandwidth).
        """
        med = statistics.median
        return {
            "ratio": med(self.wall[ref]) / med(self.wall[label]),
            "paired": med(m[ref] / m[label] for m in self.per_repeat),
            "per_repeat": [m[ref] / m[label] for m in self.per_repeat],
            "cpu": med(self.cpu[ref]) / med(self.cpu[label]),
        }


def interleaved_times(runners: Sequence[Any], *, steps: int, repeats: int, warmup: int) -> Timings:
    """Warms every runner up, then times ``steps`` steps of each per repeat, alternating the order."""
    for r in runners:
        for _ in range(warmup + getattr(r, "extra_warmup", 0)):
            r.step()
    wall: dict[str, list[float]] = {r.label: [] for r in runners}
    cpu: dict[str, list[float]] = {r.label: [] for r in runners}
    per_repeat = []
    for rep in range(repeats):
        medians = {}
        for r in runners if rep % 2 == 0 else list(reversed(runners)):
            block = []
            for _ in range(steps):
                t, c = time.perf_counter(), time.process_time()
                r.step()
                block.append(time.perf_counter() - t)
                cpu[r.label].append(time.process_time() - c)
            wall[r.label] += block
            medians[r.label] = statistics.median(block)
        per_repeat.append(medians)
    return Timings(wall, cpu, per_repeat)


def base_result(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from resnet_jax.train import compiler_options

    out = {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "half_precision": args.half_precision,
        "remat": args.remat,
        "bn_group_size": args.bn_group_size,
        "scan_blocks": args.scan_blocks,
        "space_to_depth_stem": args.s2d_stem,
        "width": args.width,
        "device": describe_devices(),
        "devices": jax.device_count(),
        "cpu_cores": cpu_cores(),
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # what the Trainer compiles its steps with on this backend (resnet_jax.train.compiler_options)
        "compiler_options": compiler_options(),
    }
    if args.devices_note is not None:
        note = f"{out['device']}, {out['cpu_cores']} CPU cores, XLA_FLAGS={out['xla_flags']!r}"
        out["devices_note"] = f"{note}; {args.devices_note}" if args.devices_note else note
    return out


def run_train_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The default mode (plus ``--compare``): ours, and the references interleaved with it."""
    import jax

    out = base_result(args)
    log(f"compiling the train step of {args.model} (batch {args.batch_size}, {args.image_size}px)")
    ours = OurStep(args)
    out.update(compile_s=ours.compile_s, trace_s=ours.trace_s)
    ma = ours.memory_analysis
    if ma is not None:
        out.update(xla_temp_bytes=int(ma.temp_size_in_bytes), xla_argument_bytes=int(ma.argument_size_in_bytes))
    macs, source = forward_macs(ours.config, args.image_size)
    out.update(forward_macs_per_image=macs, macs_source=source)
    flops = 3 * macs * 2 * args.batch_size if macs else None
    if flops is None:
        cost = ours.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) or None
        out["macs_source"] = "XLA cost_analysis of the train step"
    out["flops_per_step"] = flops
    if args.residuals:
        out["residual_bytes"] = residual_bytes(ours)
    if args.steps <= 0:  # compile only
        out["peak_mem_bytes"], out["peak_mem_kind"] = peak_memory()
        out.update(train_img_per_s=None, eval_img_per_s=None)
        return out

    # Ours alone first: its peak memory is not mixed with the references'.
    timings = interleaved_times([ours], steps=args.steps, repeats=1, warmup=args.warmup)
    out["peak_mem_bytes"], out["peak_mem_kind"] = peak_memory()
    runners: list[Any] = [ours]
    if args.compare:
        extra = options_not_in_references(args)
        if extra:
            log(f"warning: the references run without {', '.join(extra)}: the ratios compare other work")
        out["options_not_in_references"] = extra
        log("compiling the Flax Linen baseline")
        try:
            linen = LinenStep(args, ours)
        except ValueError as e:
            log(f"no Linen baseline: {e}")
            out["linen_train_img_per_s"] = None
        else:
            runners.append(linen)
            out.update(linen_compile_s=linen.compile_s, linen_params=linen.params)
        torch_mod = None if args.no_torch else load_benchmark_module("torch_resnet")
        if torch_mod is not None and torch_mod.available():
            try:
                runners.append(TorchStep(args))
            except ValueError as e:
                log(f"no torch reference: {e}")
        if not any(r.label == "torch" for r in runners):
            out["torch_train_img_per_s"] = None
    if args.repeats > 1 or len(runners) > 1:
        log(f"timing {', '.join(r.label for r in runners)}: {args.repeats} x {args.steps} steps, interleaved")
        more = interleaved_times(runners, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
        if len(runners) == 1:  # keep the first block too
            for d in (more.wall, more.cpu):
                d[ours.label] = (timings.wall if d is more.wall else timings.cpu)[ours.label] + d[ours.label]
        timings = more
    for r in runners[1:]:
        out[f"{r.label}_train_img_per_s"] = timings.img_per_s(r.label, args.batch_size)
        sp = timings.speedups(ours.label, r.label)
        out[f"ratio_vs_{r.label}"] = sp["ratio"]
        out[f"ratio_vs_{r.label}_paired"] = sp["paired"]
        out[f"ratio_vs_{r.label}_cpu"] = sp["cpu"]
        out[f"ratio_vs_{r.label}_per_repeat"] = sp["per_repeat"]
    times = timings.wall[ours.label]
    step_s = statistics.median(times)
    out["train_step_ms"] = 1e3 * step_s
    out["train_img_per_s"] = args.batch_size / step_s
    out["train_cpu_ms"] = 1e3 * statistics.median(timings.cpu[ours.label])
    out["train_step_ms_all"] = [round(1e3 * t, 3) for t in times]
    if flops:
        out["achieved_tflops"] = flops / step_s / 1e12
        peak = args.peak_tflops or peak_tflops(jax.devices()[0].device_kind, args.half_precision)
        out["peak_tflops"] = peak * jax.device_count() if peak else None
        out["mfu"] = out["achieved_tflops"] / out["peak_tflops"] if peak else None
    if not args.no_eval:
        log("timing the eval step")
        eval_times, eval_compile_s = ours.eval_times(args.steps, args.warmup)
        out.update(eval_img_per_s=median_img_per_s(eval_times, args.batch_size), eval_compile_s=eval_compile_s)
    else:
        out["eval_img_per_s"] = None
    if args.input_fed:
        log("timing the input pipeline alone, then the train step fed by it")
        out.update(time_fed(args, ours))
        out["fed_vs_synthetic"] = out["fed_img_per_s"] / out["train_img_per_s"]
    return out


# The environment as this process found it: children set their own flags from their arguments.
_ORIGINAL_ENV = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in _ORIGINAL_ENV.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def options_not_in_references(args: argparse.Namespace) -> list[str]:
    """Our options that the Linen and torch references do not run with (the space-to-depth stem
    computes the same function: not one): with any, the ratios compare other work."""
    extra = [o for o, on in (("remat", args.remat), ("bn_group_size", args.bn_group_size)) if on]
    return extra + (["scan_blocks"] if args.scan_blocks == "true" else [])


def run_subprocess(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m resnet_jax.bench argv --json`` in a fresh process; its last stdout line, parsed."""
    cmd = [sys.executable, "-m", "resnet_jax.bench", *argv, "--json"]
    log("running " + " ".join(cmd[1:]))
    p = subprocess.run(
        cmd,
        cwd=str(REPO),
        env={**_child_environment(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=None,  # progress goes straight through
        text=True,
    )
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return {"error": f"exit status {p.returncode}", "args": list(argv)}
    return json.loads(lines[-1])


def passthrough_args(args: argparse.Namespace) -> list[str]:
    """The command-line options of ``args`` that define one measurement (for a child process)."""
    out = [
        f"--model={args.model}",
        f"--batch_size={args.batch_size}",
        f"--image_size={args.image_size}",
        f"--num_classes={args.num_classes}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--repeats={args.repeats}",
        f"--scan_blocks={args.scan_blocks}",
        f"--seed={args.seed}",
    ]
    if args.half_precision:
        out.append("--half_precision")
    if args.bn_group_size:
        out.append(f"--bn_group_size={args.bn_group_size}")
    if args.s2d_stem:
        out.append("--s2d_stem")
    if args.xla_gpu_flags:
        out.append(f"--xla_gpu_flags={args.xla_gpu_flags}")
    if args.xla_flags:
        out.append(f"--xla_flags={args.xla_flags}")
    if args.residuals:
        out.append("--residuals")
    if args.no_eval:
        out.append("--no_eval")
    if args.peak_tflops:
        out.append(f"--peak_tflops={args.peak_tflops}")
    if args.width:
        out.append(f"--width={args.width}")
    if args.devices:  # (the child sets its XLA_FLAGS from it: _child_environment restores ours)
        out.append(f"--devices={args.devices}")
    if args.devices_note is not None:
        out.append(f"--devices_note={args.devices_note}")
    return out


def run_remat_compare(args: argparse.Namespace) -> dict[str, Any]:
    """With and without per-block rematerialisation, each in its own process (clean peak memory)."""
    common = [*passthrough_args(args), *([] if args.residuals else ["--residuals"])]
    plain = run_subprocess(common)
    remat = run_subprocess([*common, "--remat"])
    if "error" in plain or "error" in remat:
        raise BenchError(f"a remat_compare child failed: {plain.get('error') or remat.get('error')}")
    out = dict(plain, mode="remat_compare")
    for key in (
        "peak_mem_bytes",
        "xla_temp_bytes",
        "train_img_per_s",
        "eval_img_per_s",
        "compile_s",
        "residual_bytes",
    ):
        out[f"remat_{key}"] = remat.get(key)
    out["remat_saved_bytes"] = plain["peak_mem_bytes"] - remat["peak_mem_bytes"]
    out["remat_saved_frac"] = out["remat_saved_bytes"] / plain["peak_mem_bytes"]
    if plain.get("xla_temp_bytes") and remat.get("xla_temp_bytes") is not None:
        out["remat_xla_temp_saved_bytes"] = plain["xla_temp_bytes"] - remat["xla_temp_bytes"]
        out["remat_xla_temp_saved_frac"] = out["remat_xla_temp_saved_bytes"] / plain["xla_temp_bytes"]
    if plain.get("residual_bytes") and remat.get("residual_bytes") is not None:
        out["remat_residual_saved_frac"] = 1 - remat["residual_bytes"] / plain["residual_bytes"]
    if plain.get("train_img_per_s") and remat.get("train_img_per_s"):
        out["remat_throughput_ratio"] = remat["train_img_per_s"] / plain["train_img_per_s"]
    return out


def run_bn_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Global BatchNorm vs ``bn_group_size`` statistics on all devices, interleaved in one process."""
    import jax

    n = jax.device_count()
    group = check_bn_groups(args, n)
    out = base_result(args)
    out.update(mode="bn_compare", bn_group_size=group)
    log(f"compiling global BN and bn_group_size={group} on {n} devices")
    glob = OurStep(args, label="global", bn_group_size=None)
    grouped = OurStep(args, label="grouped", bn_group_size=group)
    out.update(compile_s=glob.compile_s, grouped_compile_s=grouped.compile_s)
    timings = interleaved_times([glob, grouped], steps=args.steps, repeats=args.repeats, warmup=args.warmup)
    out["peak_mem_bytes"], out["peak_mem_kind"] = peak_memory()
    out["train_img_per_s"] = timings.img_per_s("global", args.batch_size)
    out["grouped_train_img_per_s"] = timings.img_per_s("grouped", args.batch_size)
    sp = timings.speedups("grouped", "global")
    out["grouped_vs_global"] = sp["ratio"]
    out["grouped_vs_global_paired"] = sp["paired"]
    out["grouped_vs_global_cpu"] = sp["cpu"]
    out["grouped_vs_global_per_repeat"] = sp["per_repeat"]
    out["eval_img_per_s"] = None
    return out


# --- input pipeline ---------------------------------------------------------------------------


def _time_batches(iterator, batches: int, batch_size: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        next(iterator)
    t = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - t)


def _synthetic_photos(n: int, height: int, width: int, seed: int = 0):
    """uint8 [H, W, 3] images with photo-like JPEG sizes: smooth colour fields plus fine grain."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(n):
        coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3)).astype(np.float32)
        smooth = coarse.repeat(25, axis=0)[:height].repeat(25, axis=1)[:, :width]
        for axis in (0, 1):  # a box blur softens the blocks' edges
            smooth = (smooth + np.roll(smooth, 8, axis) + np.roll(smooth, -8, axis)) / 3
        grain = rng.normal(0, 12, smooth.shape).astype(np.float32)
        yield np.clip(smooth + grain, 0, 255).astype(np.uint8)


def _encoded_images(kind: str, n: int, size: int = 32):
    """``n`` encoded images as TFDS stores them: ``"cifar"``, random ``size``-pixel PNGs;
    ``"imagenet"``, JPEGs (quality 90) of ImageNet's typical 500x375."""
    import numpy as np
    import tensorflow as tf

    if kind == "cifar":
        rng = np.random.default_rng(0)
        return np.array([tf.io.encode_png(x).numpy() for x in rng.integers(0, 256, (n, size, size, 3), np.uint8)])
    return np.array([tf.io.encode_jpeg(x, quality=90).numpy() for x in _synthetic_photos(n, 375, 500)])


def _augmented_batches(encoded, preprocess: Callable, batch_size: int, num_classes: int | None = None):
    """A tf.data pipeline of the training augmentation over ``encoded``, repeated, built as
    ``resnet_jax.data``'s train pipeline is (parallel deterministic map, per-example seeds from the
    stream position, batch, prefetch). Yields images, or ``{"image", "label"}`` batches when
    ``num_classes`` is given."""
    import tensorflow as tf

    n = len(encoded)
    labels = tf.constant([i % (num_classes or 1) for i in range(n)], tf.int32)
    ds = tf.data.Dataset.zip(
        (tf.data.Dataset.range(2**62), tf.data.Dataset.from_tensor_slices((encoded, labels)).repeat())
    )

    def example(pos, record):
        image = preprocess(record[0], tf.stack([tf.constant(1234, tf.int64), pos]))
        return image if num_classes is None else {"image": image, "label": record[1]}

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _train_preprocess(kind: str, image_size: int) -> Callable:
    """The training augmentation of ``resnet_jax.data.augment`` for CIFAR- or ImageNet-style
    images; ``"imagenet_scale"``: paper 1's scale and colour augmentation (``imagenet_paper``)."""
    from resnet_jax.data import augment

    if kind == "cifar":
        return augment.cifar_train
    if kind == "imagenet_scale":
        return lambda img, seed: augment.imagenet_scale_train(img, seed, image_size, lighting_std=0.1)
    return lambda img, seed: augment.imagenet_train(img, seed, image_size)


PIPELINES = {
    "digits": "digits (numpy, 8x8)",
    "cifar": "CIFAR (PNG decode, pad+crop+flip)",
    "imagenet": "ImageNet (500x375 JPEG decode+crop, resize {}, flip)",
    "imagenet_scale": "ImageNet, paper 1 (500x375 JPEG decode, resize [256, 480], crop {}, flip, lighting)",
}


def run_input_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """img/s of the three input pipelines, and per CPU core (the cores this process may use)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    import numpy as np

    from resnet_jax import data
    from resnet_jax.config import get_base_config

    cores = cpu_cores()
    out: dict[str, Any] = {"mode": "input_pipeline", "cpu_cores": cores, "batch_size": args.ip_batch_size}
    b, nb = args.ip_batch_size, args.ip_batches

    # digits: the real numpy pipeline (8x8 images, translation augmentation).
    cfg = get_base_config().dataset
    cfg.name = "digits"
    it = data.train_batches(cfg, global_batch_size=b, seed=0, process_index=0, process_count=1)
    out["digits_img_per_s"] = _time_batches(it, 100 * nb, b)  # microseconds per batch: time more

    def tf_pipeline(kind: str) -> float:
        encoded = _encoded_images("cifar" if kind == "cifar" else "imagenet", args.ip_images)
        if kind == "imagenet":
            out["imagenet_jpeg_bytes_mean"] = float(np.mean([len(j) for j in encoded]))
        ds = _augmented_batches(encoded, _train_preprocess(kind, args.ip_image_size), b)
        return _time_batches(ds.as_numpy_iterator(), nb, b)

    # CIFAR: 32x32 PNGs (as TFDS stores CIFAR) through augment.cifar_train.
    out["cifar_img_per_s"] = tf_pipeline("cifar")
    # ImageNet: JPEGs of the typical 500x375 through augment.imagenet_train (decode+crop, resize, flip).
    out["imagenet_img_per_s"] = tf_pipeline("imagenet")
    # The same JPEGs through paper 1's recipe (whole decode, resize to [256, 480], crop, flip, lighting).
    out["imagenet_scale_img_per_s"] = tf_pipeline("imagenet_scale")
    out["imagenet_image_size"] = args.ip_image_size
    for name in PIPELINES:
        out[f"{name}_img_per_s_per_core"] = out[f"{name}_img_per_s"] / cores
    return out


def time_fed(args: argparse.Namespace, ours: OurStep) -> dict[str, Any]:
    """The train step fed by the host input pipeline, as a training run feeds it.

    Generated CIFAR-style PNGs (CIFAR nets) or 500x375 JPEGs (ImageNet nets) go through the
    training augmentation on tf.data's threads and ``resnet_jax.data.prefetch`` (the background
    host-to-device copy of ``train.py``) into the compiled step. Not blocked per step, as in
    training: ``steps x repeats`` steps after ``warmup``, then one wait. Also times the same
    pipeline alone, in this process, for the ceiling it sets.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    from resnet_jax import data

    kind = "cifar" if args.model.startswith("cifar") else "imagenet"
    encoded = _encoded_images(kind, args.ip_images, args.image_size)
    preprocess = _train_preprocess(kind, args.image_size)
    b = args.batch_size
    alone = _augmented_batches(encoded, preprocess, b, args.num_classes).as_numpy_iterator()
    pipeline = _time_batches(alone, args.steps * args.repeats, b, warmup=args.warmup)
    del alone
    source = _augmented_batches(encoded, preprocess, b, args.num_classes).as_numpy_iterator()
    batches = data.prefetch(source, ours.trainer.batch_sharding)
    state, metrics = ours.state, None
    try:
        for _ in range(max(args.warmup, 1)):
            state, metrics = ours.compiled(state, next(batches))
        jax.block_until_ready((state, metrics))
        n = args.steps * args.repeats
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = ours.compiled(state, next(batches))
        jax.block_until_ready((state, metrics))
        fed = n * b / (time.perf_counter() - t)
    finally:
        batches.close()
    ours.state = state
    return {"fed_input": f"{kind}-style generated images", "pipeline_img_per_s": pipeline, "fed_img_per_s": fed}


# --- output -----------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _mib(v: Any) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f} MiB"


def _ratio(r: dict[str, Any], ref: str) -> str:
    if r.get(f"ratio_vs_{ref}") is None:
        return "n/a"
    return (
        f"{r[f'ratio_vs_{ref}']:.2f} ({_fmt(r.get(f'ratio_vs_{ref}_paired'), 2)}; "
        f"{_fmt(r.get(f'ratio_vs_{ref}_cpu'), 2)})"
    )


def _variant(r: dict[str, Any]) -> str:
    """The XLA flags and non-default options of a run, for the tables."""
    parts = [f"`{f}`" for f in (r.get("xla_flags") or "").split() if "device_count" not in f]
    parts += [f"`{k}={v}`" for k, v in (r.get("compiler_options") or {}).items()]
    if r.get("bn_group_size"):
        parts.append(f"bn_group_size={r['bn_group_size']}")
    if r.get("remat"):
        parts.append("remat")
    if r.get("space_to_depth_stem"):
        parts.append("space_to_depth_stem")
    if r.get("width"):
        parts.append(f"width={r['width']}")
    return ", ".join(parts) or "defaults"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: a header line, its separator, one line per row of cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _dtype(r: dict[str, Any]) -> str:
    return "bf16" if r["half_precision"] else "fp32"


def _what_ran(r: dict[str, Any]) -> tuple:
    """The first columns of a train-step table: model, image size, batch, dtype."""
    return r["model"], r["image_size"], r["batch_size"], _dtype(r)


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of benchmark results, one table per kind of measurement."""
    sections = []
    train = [r for r in results if "mode" not in r and r.get("train_img_per_s") and "error" not in r]
    if train:
        headers = (
            "model", "image", "batch", "dtype", "XLA flags, options", "ours img/s", "Linen img/s",
            "ours / Linen (paired; CPU time)", "torch img/s", "ours / torch", "eval img/s",
            "compile s (ours / Linen)", "peak mem", "MFU",
        )  # fmt: skip
        rows = [
            (
                *_what_ran(r),
                _variant(r),
                _fmt(r["train_img_per_s"]),
                _fmt(r.get("linen_train_img_per_s")),
                _ratio(r, "linen"),
                _fmt(r.get("torch_train_img_per_s")),
                _fmt(r.get("ratio_vs_torch"), 2),
                _fmt(r.get("eval_img_per_s")),
                f"{_fmt(r['compile_s'])} / {_fmt(r.get('linen_compile_s'))}",
                _mib(r.get("peak_mem_bytes")),
                "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
            )  # fmt: skip
            for r in train
        ]
        sections.append(_table(headers, rows))
    compile_only = [r for r in results if "mode" not in r and r.get("train_img_per_s") is None and "compile_s" in r]
    if compile_only:
        headers = ("model", "batch", "train-step compile s (lower + compile)", "of which tracing s", "peak mem")
        rows = [
            (r["model"], r["batch_size"], _fmt(r["compile_s"]), _fmt(r["trace_s"]), _mib(r.get("peak_mem_bytes")))
            for r in compile_only
        ]
        sections.append(_table(headers, rows))
    remat = [r for r in results if r.get("mode") == "remat_compare"]
    if remat:
        headers = (
            "model", "batch", "XLA flags", "autodiff residuals", "with remat", "peak mem", "with remat", "saved",
            "XLA temp buffers", "with remat", "saved", "img/s", "with remat",
        )  # fmt: skip
        rows = [
            (
                r["model"],
                r["batch_size"],
                r.get("xla_flags") or "default",
                _mib(r.get("residual_bytes")),
                _mib(r.get("remat_residual_bytes")),
                _mib(r["peak_mem_bytes"]),
                _mib(r["remat_peak_mem_bytes"]),
                f"{_mib(r['remat_saved_bytes'])} ({100 * r['remat_saved_frac']:.0f}%)",
                _mib(r.get("xla_temp_bytes")),
                _mib(r.get("remat_xla_temp_bytes")),
                f"{_mib(r.get('remat_xla_temp_saved_bytes'))} ({100 * (r.get('remat_xla_temp_saved_frac') or 0):.0f}%)",
                _fmt(r.get("train_img_per_s")),
                _fmt(r.get("remat_train_img_per_s")),
            )  # fmt: skip
            for r in remat
        ]
        sections.append(_table(headers, rows))
    bn = [r for r in results if r.get("mode") == "bn_compare"]
    if bn:
        headers = (
            "model", "batch", "devices", "global BN img/s", "grouped BN img/s (group)",
            "grouped / global (paired; CPU time)",
        )  # fmt: skip
        rows = [
            (
                r["model"],
                r["batch_size"],
                r["devices"],
                _fmt(r["train_img_per_s"]),
                f"{_fmt(r['grouped_train_img_per_s'])} ({r['bn_group_size']})",
                f"{_fmt(r['grouped_vs_global'], 2)} ({_fmt(r.get('grouped_vs_global_paired'), 2)}; "
                f"{_fmt(r.get('grouped_vs_global_cpu'), 2)})",
            )  # fmt: skip
            for r in bn
        ]
        sections.append(_table(headers, rows))
    pipes = [r for r in results if r.get("mode") == "input_pipeline"]
    if pipes:
        rows = [
            (
                what.format(r.get("imagenet_image_size")),
                r["cpu_cores"],
                _fmt(r[name + "_img_per_s"]),
                _fmt(r[name + "_img_per_s_per_core"]),
            )
            for r in pipes
            for name, what in PIPELINES.items()
            if name + "_img_per_s" in r  # results written before a pipeline was added lack it
        ]
        sections.append(_table(("pipeline", "cores", "img/s", "img/s per core"), rows))
    fed = [r for r in results if r.get("fed_img_per_s")]
    if fed:
        headers = (
            "model", "image", "batch", "dtype", "CPU cores", "train img/s (batch on device)",
            "input pipeline alone img/s", "train img/s fed by the pipeline", "fed / on device",
        )  # fmt: skip
        rows = [
            (
                *_what_ran(r),
                r["cpu_cores"],
                _fmt(r["train_img_per_s"]),
                _fmt(r["pipeline_img_per_s"]),
                _fmt(r["fed_img_per_s"]),
                f"{r['fed_vs_synthetic']:.2f}",
            )  # fmt: skip
            for r in fed
        ]
        sections.append(_table(headers, rows))
    errors = [r for r in results if "error" in r]
    if errors:
        sections.append("\n".join(f"- failed: {' '.join(r['args'])}: {r['error']}" for r in errors))
    return "\n\n".join(sections)


def summary_lines(r: dict[str, Any]) -> str:
    """A short human-readable account of one result."""
    if r.get("mode") == "input_pipeline":
        return markdown([r])
    lines = [f"{r['model']}, batch {r['batch_size']}, {r['image_size']}px, {r['device']}"]
    for key, label in (
        ("train_img_per_s", "train img/s"),
        ("eval_img_per_s", "eval img/s"),
        ("compile_s", "train-step compile s"),
        ("linen_train_img_per_s", "Linen train img/s"),
        ("ratio_vs_linen", "ours / Linen"),
        ("torch_train_img_per_s", "torch train img/s"),
        ("ratio_vs_torch", "ours / torch"),
        ("grouped_train_img_per_s", "grouped-BN train img/s"),
        ("grouped_vs_global", "grouped / global BN"),
        ("remat_train_img_per_s", "remat train img/s"),
        ("pipeline_img_per_s", "input pipeline alone img/s"),
        ("fed_img_per_s", "train img/s fed by the input pipeline"),
        ("fed_vs_synthetic", "fed / synthetic on device"),
    ):
        if key in r:
            lines.append(f"  {label}: {_fmt(r[key], 2)}")
    for key in ("peak_mem_bytes", "remat_peak_mem_bytes", "remat_saved_bytes", "xla_temp_bytes"):
        if r.get(key) is not None:
            lines.append(f"  {key}: {_mib(r[key])}")
    if r.get("mfu") is not None:
        lines.append(f"  MFU: {100 * r['mfu']:.2f}% of {r['peak_tflops']:.0f} TFLOP/s")
    elif r.get("achieved_tflops"):
        lines.append(f"  achieved: {r['achieved_tflops']:.3f} TFLOP/s (no known peak for this device; --peak_tflops)")
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    results = [run_subprocess(argv) for argv in SWEEPS[args.sweep]]
    return {"mode": "sweep", "sweep": args.sweep, "results": results, "markdown": markdown(results)}


# --- CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m resnet_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50", help="a model of the zoo, e.g. resnet18, cifar_resnet56")
    p.add_argument("--batch_size", type=int, default=32, help="global batch (split over the devices)")
    p.add_argument("--image_size", type=int, default=None, help="default 224; 32 for CIFAR nets")
    p.add_argument("--num_classes", type=int, default=None, help="default 1000; 10 for CIFAR nets")
    p.add_argument("--half_precision", action="store_true", help="bf16 compute, float32 parameters")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (0: compile only)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3 when comparing, else 1)")
    p.add_argument("--remat", action="store_true", help="model.remat: per-block rematerialisation")
    p.add_argument("--bn_group_size", type=int, default=None, help="images per BN statistics group")
    p.add_argument("--scan_blocks", default="auto", choices=("auto", "true", "false"), help="model.scan_blocks")
    p.add_argument("--s2d_stem", action="store_true", help="model.space_to_depth_stem (ImageNet nets)")
    p.add_argument("--width", type=int, default=None, help="model.width, base channels (default: the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end the output with one JSON line")
    p.add_argument("--compare", action="store_true", help="also time the Linen baseline and torch, interleaved")
    p.add_argument("--no_torch", action="store_true", help="with --compare: skip PyTorch")
    p.add_argument("--no_eval", action="store_true", help="skip the eval step")
    p.add_argument("--remat_compare", action="store_true", help="peak memory with and without remat")
    p.add_argument("--bn_compare", action="store_true", help="global BN vs --bn_group_size (default batch/devices)")
    p.add_argument("--devices", type=int, default=None, help="simulated CPU devices (sets XLA_FLAGS)")
    p.add_argument("--input_pipeline", action="store_true", help="input pipelines alone, img/s per core")
    p.add_argument(
        "--input_fed",
        action="store_true",
        help="also time the train step fed by the tf.data pipeline (generated images)",
    )
    p.add_argument("--cores", type=int, default=None, help="pin to this many CPU cores")
    p.add_argument("--ip_images", type=int, default=256, help="input pipeline: distinct generated images")
    p.add_argument("--ip_batches", type=int, default=20, help="input pipeline: timed batches")
    p.add_argument("--ip_batch_size", type=int, default=128, help="input pipeline: batch size")
    p.add_argument("--ip_image_size", type=int, default=224, help="input pipeline: ImageNet crop size")
    p.add_argument("--sweep", choices=sorted(SWEEPS), default=None, help="a predefined list, as markdown tables")
    p.add_argument(
        "--markdown", nargs="+", default=None, metavar="FILE", help="tables of saved --json results (JSON lines)"
    )
    p.add_argument(
        "--xla_gpu_flags",
        nargs="?",
        const=DEFAULT_XLA_GPU_FLAGS,
        default=None,
        help=f"XLA GPU flags set before JAX starts (default: {DEFAULT_XLA_GPU_FLAGS})",
    )
    p.add_argument("--xla_flags", default=None, help="more XLA_FLAGS, set before JAX starts")
    p.add_argument(
        "--residuals", action="store_true", help="also report the bytes autodiff saves for the backward pass"
    )
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for the MFU (overrides the table)")
    p.add_argument(
        "--devices_note", nargs="?", const="", default=None, help="add a description of the devices (and TEXT)"
    )
    return p


# The modes ``run`` dispatches to, one per run: with two, all but one would be silently ignored.
# (--compare and --input_fed are both parts of the default mode and go together.)
MODES = ("markdown", "sweep", "input_pipeline", "remat_compare", "bn_compare", "compare", "input_fed")
# --devices simulates CPU devices (--xla_force_host_platform_device_count); far more start for minutes.
MAX_SIMULATED_DEVICES = 1024


def check_arguments(args: argparse.Namespace) -> None:
    """The checks of the arguments alone, before the environment is touched; raises BenchError."""
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise BenchError(f"--peak_tflops={args.peak_tflops}; give the device's dense peak in TFLOP/s, a number > 0")
    for key in ("batch_size", "image_size", "num_classes", "bn_group_size", "devices", "cores", "repeats", "width"):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise BenchError(f"--{key}={v}; must be a positive integer")
    if args.steps < 0 or args.warmup < 0:
        raise BenchError("--steps and --warmup must be >= 0")
    if args.steps == 0 and (args.compare or args.bn_compare):
        raise BenchError("--compare and --bn_compare time steps: use --steps >= 1")
    given = [m for m in MODES if getattr(args, m)]
    for i, a in enumerate(given):
        for b in given[i + 1 :]:
            if {a, b} != {"compare", "input_fed"}:
                raise BenchError(f"--{a} and --{b} are separate modes (one would be ignored): run them one at a time")
    for key in ("ip_images", "ip_batches", "ip_batch_size", "ip_image_size"):
        v = getattr(args, key)
        if v < 1:
            raise BenchError(f"--{key}={v}; must be a positive integer")
    if args.devices is not None and args.devices > MAX_SIMULATED_DEVICES:
        raise BenchError(
            f"--devices={args.devices} simulated CPU devices is too many: use at most {MAX_SIMULATED_DEVICES}"
        )
    if args.s2d_stem and args.image_size is not None and args.image_size % 2:
        raise BenchError(
            f"--s2d_stem needs an even --image_size (got {args.image_size}): "
            "the model skips the space-to-depth stem for odd sizes"
        )
    if args.bn_compare:
        check_bn_groups(args, args.devices)
    # --xla_flags is appended to the environment's XLA_FLAGS, so it cannot name a flag file.
    problem = (
        cli.xla_flags_problem(os.environ.get("XLA_FLAGS", ""))
        or cli.xla_flags_problem(args.xla_flags or "", "--xla_flags", flag_file=False)
        or cli.xla_flags_problem(args.xla_gpu_flags or "", "--xla_gpu_flags", flag_file=False)
    )
    if problem:
        raise BenchError(problem)


def check_bn_groups(args: argparse.Namespace, devices: int | None) -> int | None:
    """``--bn_compare``'s group size (None while the device count is unknown); refuses a comparison of
    global BN with itself (one group holding the whole batch)."""
    if args.bn_group_size:
        group, why = args.bn_group_size, f"--bn_group_size={args.bn_group_size}"
    elif devices:
        group, why = max(1, args.batch_size // devices), f"--batch_size over {devices} device(s)"
    else:
        return None
    if group >= args.batch_size:
        raise BenchError(
            f"--bn_compare would compare global BN with itself: its groups ({why}) are the whole "
            f"--batch_size={args.batch_size}; use --devices >= 2 or a smaller --bn_group_size"
        )
    return group


def validate(args: argparse.Namespace) -> None:
    """Checks the model name and what depends on it before any heavy work (after
    ``check_arguments``, which ``run`` calls first); raises BenchError."""
    if args.input_pipeline or args.sweep:
        return
    if args.width is not None and args.compare and not args.no_torch:
        raise BenchError("--width applies to ours and the Linen baseline, not to torchvision: add --no_torch")
    if args.input_fed and (args.steps == 0 or args.remat_compare or args.bn_compare):
        raise BenchError("--input_fed times steps of the default mode: use --steps >= 1, without the *_compare modes")
    if args.input_fed and args.model.startswith("cifar") and args.image_size != 32:
        raise BenchError("--input_fed feeds the 32x32 CIFAR augmentation to CIFAR nets: use --image_size=32")
    from resnet_jax.models import resolve_options

    try:
        resolve_options(
            args.model,
            remat=args.remat,
            bn_group_size=args.bn_group_size,
            space_to_depth_stem=args.s2d_stem,
            width=args.width,
        )
    except ValueError as e:
        raise BenchError(first_line(e)) from None
    if args.bn_group_size and args.batch_size % args.bn_group_size:
        raise BenchError(f"--batch_size={args.batch_size} is not divisible by --bn_group_size={args.bn_group_size}")


def read_results(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON objects of saved ``--json`` outputs (one per line; other lines are skipped)."""
    results = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise BenchError(f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise BenchError(f"cannot read {path}: not a text file; pass the output of --json runs") from None
        for line in lines:
            if line.startswith("{"):
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:
                    raise BenchError(f"{path}: a line starting with '{{' is not JSON") from None
                # A saved --sweep --json line holds its runs' results.
                is_sweep = isinstance(result, dict) and result.get("mode") == "sweep"
                results += result.get("results", []) if is_sweep else [result]
    if not results:
        raise BenchError(f"no JSON results in {' '.join(paths)}")
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_arguments(args)
    if args.markdown:
        results = read_results(args.markdown)
        try:
            text = markdown(results)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a JSON line with some of a result's keys
            raise BenchError(
                f"a JSON line in {' '.join(args.markdown)} is not a complete bench result "
                f"({type(e).__name__}: {e}); pass the output of --json runs"
            ) from None
        if not text:
            raise BenchError(
                f"no bench results in {' '.join(args.markdown)}: its JSON lines are not the output of "
                "--json runs (a training run's metrics.jsonl?)"
            )
        return {"mode": "sweep", "sweep": "files", "results": results, "markdown": text}
    args.image_size = args.image_size or default_image_size(args.model)
    args.num_classes = args.num_classes or default_num_classes(args.model)
    if args.repeats is None:
        args.repeats = 3 if (args.compare or args.bn_compare) else 1
    if not (args.input_pipeline or args.sweep):  # the modes that start JAX with these flags
        check_xla_flags(args)
    prepare_environment(args)
    validate(args)
    if args.sweep:
        return run_sweep(args)
    if args.input_pipeline:
        return run_input_pipeline(args)
    use_fast_prng()
    if args.remat_compare:
        return run_remat_compare(args)
    if args.bn_compare:
        return run_bn_compare(args)
    return run_train_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0, or 2 after a one-line ``error: ...``."""
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (BenchError, UserError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    if result.get("mode") == "sweep":
        print(result["markdown"])
    else:
        print(summary_lines(result))
    if args.json:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
