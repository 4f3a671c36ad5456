"""Command-line plumbing shared by the entry points: flags, multi-host start-up, and turning a
``UserError`` into one line on stderr and a non-zero exit (no traceback wall)."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

from resnet_jax.errors import UserError

EXIT_USAGE = 2


def fail(message: str) -> None:
    """Prints ``error: message`` (one line) and exits with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def guarded(fn):
    """Runs ``fn`` with ``UserError`` -> one line and exit 2."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))

    return wrapper


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs)")
    flags.DEFINE_integer("num_processes", None, "number of processes in a multi-host run")
    flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run")


def init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Starts JAX's multi-host runtime when asked by flags, or when SLURM (several tasks) or a
    multi-host TPU VM is detected; a single process needs nothing."""
    import jax

    explicit = coordinator_address is not None or (num_processes or 1) > 1
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm or tpu_pod):
        return
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise UserError("multi-host runs need --coordinator_address, --num_processes and --process_id together")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU collectives across processes go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_config_or_fail():
    """Reads ``--config``; any problem with the file is a one-line error."""
    try:
        return flags.FLAGS.config
    except Exception as e:  # noqa: BLE001
        fail(f"cannot load --config: {e}")


def train_main(argv=None) -> None:
    """Entry point of ``python -m resnet_jax.train``."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
    flags.DEFINE_bool("fresh", False, "set aside checkpoints of a different model/dataset in --workdir and start over")
    define_distributed_flags()
    app.run(_train, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0] if str(e) else "bad flags")
    except Exception as e:  # noqa: BLE001 - config files fail with anything (syntax, IO, KeyError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"bad --config or override: {msg}")


@guarded
def _train(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; overrides look like --config.key=value")
    setup_logging()
    f = flags.FLAGS
    if f.config is None:
        raise UserError("--config is required, e.g. --config=experiments/digits.py")
    if not f.workdir:
        raise UserError("--workdir is required")
    init_distributed(f.coordinator_address, f.num_processes, f.process_id)
    from resnet_jax.train import train_and_evaluate

    result = train_and_evaluate(f.config, f.workdir, fresh=f.fresh)
    if result:
        print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
