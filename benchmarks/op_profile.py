"""Where a train step's time goes, op by op: a ``jax.profiler`` trace of our step, summed by kind.

    python benchmarks/op_profile.py --model cifar_resnet56 --batch_size 128 [--steps 2] [--no_options]

Prints the wall time per step, then the time per step of the compiled program's ops (summed over
XLA's threads, so the total can exceed the wall time): by fusion kind, and the convolutions split
into forward, input-gradient and weight-gradient ones. ``--no_options`` compiles the step without
``resnet_jax.train.compiler_options()``. benchmarks/RESULTS.md section 2d uses it.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

from resnet_jax import bench  # noqa: E402


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """Milliseconds per step of each compiled op in the trace (XLA's thread pools only)."""
    (path,) = Path(trace_dir).rglob("*.xplane.pb")
    times: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for ev in line.events:
                if "ThunkExecutor" not in ev.name and "Await" not in ev.name:
                    times[ev.name] += ev.duration_ns / 1e6 / steps
    return times


def conv_kinds(hlo: str) -> dict[str, str]:
    """YNNPACK fusion name -> the convolution it computes: forward, input-grad or weight-grad."""
    kinds = {}
    for name, operands, rest in re.findall(r"^\s+%(ynn_fusion[.\d]*) = \S+ fusion\(([^)]*)\)(.*)$", hlo, re.M):
        if "transpose(jvp())/conv" in rest:
            kinds[name] = "input-grad convolution"
        elif "jvp()/conv" in rest:
            kinds[name] = "forward convolution"
        elif "transpose_copy" in operands:  # XLA:CPU feeds weight gradients transposed copies
            kinds[name] = "weight-grad convolution"
    return kinds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--no_options", action="store_true", help="compile without train.compiler_options()")
    a = p.parse_args(argv)
    args = bench.build_parser().parse_args([f"--model={a.model}", f"--batch_size={a.batch_size}"])
    args.image_size = a.image_size or bench.default_image_size(a.model)
    args.num_classes = bench.default_num_classes(a.model)
    step = bench.OurStep(args)
    if a.no_options:
        fn = step.trainer.train_step.__wrapped__
        step.compiled = jax.jit(fn, donate_argnums=0).lower(step.state, step.batch).compile()
    for _ in range(2):
        step.step()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step.step()
        wall = (time.perf_counter() - t0) / a.steps
        jax.profiler.stop_trace()
        times = op_times(d, a.steps)
    kinds = conv_kinds(step.compiled.as_text())
    by_kind: collections.Counter = collections.Counter()
    for name, ms in times.items():
        by_kind[kinds.get(name, re.sub(r"[.\d]+$", "", name))] += ms
    print(f"{a.model}, batch {a.batch_size}, {args.image_size}px: {1e3 * wall:.0f} ms per step (wall)")
    print(f"  ops, summed over threads: {sum(times.values()):.0f} ms per step")
    for kind, ms in by_kind.most_common(12):
        print(f"  {ms:8.1f} ms  {kind}")


if __name__ == "__main__":
    main()
