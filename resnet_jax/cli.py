"""Command-line plumbing shared by the entry points: flags, multi-host start-up, and turning a
``UserError`` into one line on stderr and a non-zero exit (no traceback wall)."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import NoReturn

from absl import app, flags

from resnet_jax.errors import DropMessages, UserError, first_line

EXIT_USAGE = 2


def fail(message: str) -> None:
    """Prints ``error: message`` (one line) and exits with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line, ``error: ...``, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block first; the project's tools print one line.
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def _flags_problem(e: flags.Error) -> str:
    return first_line(e, default="bad flags")


def parse_flags(argv):
    """absl's flag parsing, with a bad flag as one ``error: ...`` line and exit 2 (absl itself
    prints "FATAL Flags parsing error" and a hint, and exits 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{_flags_problem(e)} (see --help)")


def run(main) -> None:
    """``absl.app.run(main)`` with ``parse_flags``: the entry point of the absl-flag tools."""
    app.run(main, flags_parser=parse_flags)


def guarded(fn):
    """Runs ``fn`` with ``UserError`` -> one line and exit 2."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))

    return wrapper


def check_output_dir(path: pathlib.Path, label: str) -> None:
    """Refuses a directory that cannot be created: ``path`` or an ancestor is a file."""
    for q in (path, *path.parents):
        if q.exists():
            if not q.is_dir():
                where = "is a file, not a directory" if q == path else f"is under {q}, a file, not a directory"
                raise UserError(f"{label} {path} {where}; choose another path")
            return


def xla_flags_problem(text: str, label: str = "XLA_FLAGS", flag_file: bool = True) -> str | None:
    """What is wrong with ``text`` as XLA_FLAGS, or None. XLA takes a value that does not start
    with "--" as the name of a file of flags, and silently drops every flag after a word that is
    not one ("--a=1 b --c=2" sets only a); unknown flags it reports itself, as one fatal line."""
    value = text.strip()
    if flag_file and value and not value.startswith("--") and os.path.isfile(value):
        return None  # XLA's flag-file form
    words = [w for w in value.split() if not w.startswith("--")]
    if words:
        return f"{label}={text}: {words[0]!r} is not an XLA flag (XLA would drop the flags after it); give --name=value flags"
    return None


def check_environment() -> None:
    """The environment the run inherits: XLA_FLAGS (see ``xla_flags_problem``)."""
    problem = xla_flags_problem(os.environ.get("XLA_FLAGS", ""))
    if problem:
        raise UserError(problem)


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs)")
    flags.DEFINE_integer("num_processes", None, "number of processes in a multi-host run")
    flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run")


def init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Starts JAX's multi-host runtime when asked by flags, or when SLURM (several tasks) or a
    multi-host TPU VM is detected; a single process needs nothing."""
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm or tpu_pod):
        return
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise UserError("multi-host runs need --coordinator_address, --num_processes and --process_id together")
    if explicit and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise UserError(
            f"--num_processes={num_processes} --process_id={process_id}: "
            "use N >= 1 processes, numbered 0 to N-1 (each process gets its own --process_id)"
        )
    import jax

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
    # TensorFlow (TFDS datasets) logs C++ INFO lines such as "This TensorFlow binary is optimized
    # to use available CPU instructions". On CPUs where it turns its oneDNN custom operations on
    # (AVX-512 with VNNI/BF16), it says so twice on import, whatever TF_CPP_MIN_LOG_LEVEL says
    # (tensorflow-cpu 2.21), before any error of ours. The input pipelines use none of those
    # operations (oneDNN speeds up matmuls and convolutions; decoding, resizing and cropping are
    # TensorFlow's own kernels), so they are off in the command-line tools.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Under absl.app the root logger already has absl's handler (basicConfig is then a no-op) at
    # WARNING: this package's INFO lines (e.g. "resumed from ...") are wanted.
    logging.getLogger("resnet_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TFDS says this before a dataset that is not prepared yet is (the error or preparation
    # follows). (Orbax's "Given directory is read only": resnet_jax.checkpointing.)
    logging.getLogger("absl").addFilter(DropMessages("Variant folder"))


def _config_problem(e: BaseException) -> str:
    """The informative line of an error raised while loading a config file."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    # ml_collections wraps file errors (and errors inside get_config) in a multi-line message whose
    # last line is the cause: "[Errno 2] No such file or directory: 'x.py'", "NameError: ...".
    line = lines[-1]
    return line[line.index("[Errno") :] if "[Errno" in line else line


def _config_arg(argv) -> str:
    """The value given to ``--config`` on the command line."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _unreadable_config(argv, e: BaseException) -> str:
    return (
        f"cannot load --config={_config_arg(argv)} ({_config_problem(e)}); "
        "pass a readable experiment file, e.g. --config=experiments/digits.py"
    )


def check_config(config) -> None:
    """The model's name and options and the run's keys (plain Python, before JAX is imported):
    the trainer's own message for a bad one, at once."""
    from resnet_jax.config import check_run_config, model_options
    from resnet_jax.models.spec import resolve_options

    try:
        resolve_options(config.model.name, **model_options(config))
        check_run_config(config)
    except ValueError as e:
        raise UserError(str(e)) from None


def train_main(argv=None) -> None:
    """Entry point of ``python -m resnet_jax.train``."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
    flags.DEFINE_bool(
        "fresh", False, "start over: move an earlier run's checkpoints, metrics and config to --workdir/old-<time>/"
    )
    define_distributed_flags()
    app.run(_train, argv=argv, flags_parser=_parse_flags)


def _override_args(argv, key: str) -> list[str]:
    """The ``--config.…`` arguments whose path contains ``key`` (to name them in an error)."""
    args = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    return [a for a in args if key in a[len("--config.") :].split(".")] or args


def config_error(argv, e: BaseException) -> str:
    """The one line for an exception raised while parsing ``--config`` and its overrides."""
    if isinstance(e, flags.Error):
        if "Error whilst parsing config file" in str(e):  # get_config raised: its own last line
            problem = _config_problem(e)
            if "get_config() takes" in problem:  # a ':variant' the file does not take, or one missing
                problem += " (the file's docstring lists its variants)"
            return f"cannot load --config={_config_arg(argv)}: {problem}"
        msg = _flags_problem(e)
        if "--config." in msg:
            msg += "; give a value of the key's type (the keys and their defaults are in resnet_jax/config.py)"
        return msg
    if isinstance(e, AttributeError):  # an override of a key the config does not have (a KeyError inside)
        cause = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
        text = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause)
        key, _, hint = text.strip().strip("'\"").partition("\n")
        key = key.strip("'\"")
        names = ", ".join(_override_args(argv, key))
        hint = f" ({hint.strip()})" if hint.strip() else ""
        return (
            f"unknown config key {key!r} in {names}{hint}; check the spelling "
            "(the keys and their defaults are in resnet_jax/config.py)"
        )
    if isinstance(e, SyntaxError):
        return f"cannot load --config: {e.msg} ({e.filename}, line {e.lineno}); fix the file"
    if isinstance(e, OSError):  # a missing or unreadable file
        return _unreadable_config(argv, e)
    return f"cannot load --config or apply an override: {_config_problem(e)}"


def parse_config_flags(argv, flag_values=None):
    """Parses ``argv`` into ``flag_values`` (absl's global flags by default), which define
    ``--config``; any problem with the file or an override is a ``UserError`` of one line."""
    fv = flags.FLAGS if flag_values is None else flag_values
    try:
        parsed = fv(argv)
        if fv["config"].value is not None:
            # ml_collections defers a config file's I/O errors to the first use of the config.
            fv["config"].value.get("model")
    except Exception as e:  # noqa: BLE001 - config files fail with anything (IO, NameError in get_config)
        raise UserError(config_error(argv, e)) from None
    return parsed


def experiment_config(spec: str, *overrides: str):
    """An experiment file's config as ``python -m resnet_jax.train`` builds and checks it, for
    Python callers: ``experiment_config("experiments/digits.py", "--config.model.name=cifar_resnet8")``
    (``spec`` may carry the file's ``:argument``; overrides as on the command line).

    Raises:
      UserError: the file, an override or a checked value is bad (one line).
    """
    from ml_collections import config_flags

    argv = ["resnet_jax", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv, lock_config=True)
    parse_config_flags(argv, fv)
    check_config(fv.config)
    return fv.config


def _parse_flags(argv):
    try:
        return parse_config_flags(argv)
    except UserError as e:
        fail(str(e))


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
    from resnet_jax.workdir import check_filesystem_path

    check_filesystem_path(f.workdir)
    check_config(f.config)
    check_environment()
    init_distributed(f.coordinator_address, f.num_processes, f.process_id)
    from resnet_jax.train import train_and_evaluate

    result = train_and_evaluate(f.config, f.workdir, fresh=f.fresh)
    if result:
        print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
