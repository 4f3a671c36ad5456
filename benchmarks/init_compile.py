"""Compile time of the Trainer's state initialisation: with ``train.init_compiler_options()`` (LLVM
-O1 on the CPU) against XLA's default (-O3), each in a fresh process, and whether the two states
are bit for bit equal.

    python benchmarks/init_compile.py [--models cifar_resnet20,cifar_resnet56,resnet50]

benchmarks/RESULTS.md section 2e uses it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_XLA = {"xla_backend_optimization_level": 3}


def one(model: str, options: str, out: str | None) -> dict:
    """In this process: lower + compile + run the initialisation once, with ``options``."""
    import jax
    import numpy as np

    from resnet_jax import bench, data, train
    from resnet_jax.schedules import Durations

    args = bench.build_parser().parse_args([f"--model={model}", "--batch_size=8"])
    args.image_size, args.num_classes = bench.default_image_size(model), bench.default_num_classes(model)
    config = bench.bench_config(args)
    info = data.get_info(config.dataset)
    trainer = train.Trainer(config, info, Durations.from_config(config, info.num_train))
    jax.jit(lambda x: x + 1)(1.0).block_until_ready()  # the backend's own start-up, not timed
    opts = train.init_compiler_options() if options == "ours" else DEFAULT_XLA
    t0 = time.perf_counter()
    lowered = jax.jit(trainer._init, out_shardings=trainer.state_shardings).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=opts)
    t2 = time.perf_counter()
    state = jax.block_until_ready(compiled())
    t3 = time.perf_counter()
    if out:
        np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(state)])
    return {"model": model, "options": opts, "trace_s": t1 - t0, "compile_s": t2 - t1, "run_s": t3 - t2}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cifar_resnet20,cifar_resnet56,resnet50")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "OPTIONS", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(*a.one)))
        return
    import tempfile

    import numpy as np

    from resnet_jax import cli
    from resnet_jax.models import resolve_options

    models = a.models.split(",")
    for model in models:  # a bad name: one line, before any subprocess starts
        try:
            resolve_options(model)
        except ValueError as e:
            cli.fail(f"--models: {e}")
    with tempfile.TemporaryDirectory() as d:
        for model in models:
            rows = {}
            for options in ("ours", "xla_default"):
                out = f"{d}/{model}-{options}.npz"
                cmd = [sys.executable, __file__, "--one", model, options, out]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                rows[options] = json.loads(line)
            a_, b_ = np.load(f"{d}/{model}-ours.npz"), np.load(f"{d}/{model}-xla_default.npz")
            same = all(np.array_equal(a_[k], b_[k]) for k in a_.files)
            ours, default = rows["ours"], rows["xla_default"]
            print(
                f"{model}: compile {ours['compile_s']:.1f} s with {ours['options']} against "
                f"{default['compile_s']:.1f} s at XLA's default; run {ours['run_s']:.3f} / {default['run_s']:.3f} s; "
                f"bit-identical states: {same}",
                flush=True,
            )
            print(json.dumps({"model": model, "ours": ours, "xla_default": default, "bit_identical": same}), flush=True)


if __name__ == "__main__":
    main()
