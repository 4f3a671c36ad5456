"""Bad input to the command-line tools: one line saying what to do, a non-zero exit, no traceback,
and nothing in an existing workdir modified. Every case is a real ``python -m ...`` process (run
several at a time); each gets its own copy of a real run's workdir and compares a snapshot of
every file (contents and modification times) before and after."""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from cli_env import assert_one_line_error, env_for, snapshot, tree, user_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = [
    "--config=experiments/digits.py",
    "--config.model.name=cifar_resnet8",
    "--config.batch_size=32",
    "--config.num_steps=16",  # as in test_reliability: the same compiled train step
    "--config.log_every_steps=1",
    "--config.eval_every_epochs=100",
    "--config.progress_bar=false",
    "--config.plot_curves=false",  # matplotlib: 1-1.5 s of each short run
]
# CIFAR-10 is downloaded when missing; offline, TFDS retries for minutes before giving up. The
# command is the real entry point with TFDS's retry count set to 0, so the test sees the same
# error at once.
NO_RETRY_TRAIN = (
    "import tensorflow_datasets.core.download.downloader as d; d.MAX_RETRIES = 0; "
    "from resnet_jax.train import main; main()"
)


def run(cache: str, argv: list[str], devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env_for(cache, devices), capture_output=True, text=True, timeout=300
    )


def train(*args: str) -> list[str]:
    return ["-m", "resnet_jax.train", *args]


@pytest.fixture(scope="module")
def existing(tmp_path_factory, jax_cache) -> pathlib.Path:
    """A finished run: checkpoints (steps 8 and 16), metrics, config, event files, curves."""
    wd = tmp_path_factory.mktemp("existing")
    p = run(jax_cache, train(*BASE, "--config.checkpoint_every_steps=8", f"--workdir={wd}"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["16", "8"]
    assert (wd / "metrics.jsonl").is_file()
    return wd


def _config_files(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    (tmp / "syntax_error.py").write_text("def get_config(:\n    return None\n")
    (tmp / "a_directory.py").mkdir()
    return {"missing": tmp / "missing.py", "syntax": tmp / "syntax_error.py", "directory": tmp / "a_directory.py"}


def _train_cases(tmp: pathlib.Path) -> dict[str, tuple]:
    """name -> (argv without --workdir, devices, needles, max stderr lines)."""
    files = _config_files(tmp)
    empty = tmp / "empty_data"
    empty.mkdir()

    def with_config(path):
        return [f"--config={path}", *BASE[1:]]

    return {
        "unknown_key": (train(*BASE, "--config.nope=1"), 1, ["unknown config key 'nope'", "--config.nope"], 6),
        "typo_key": (train(*BASE, "--config.model.nam=x"), 1, ["'nam'", 'Did you mean "name"'], 6),
        "wrong_type": (
            train(*BASE, "--config.batch_size=abc"),
            1,
            ["--config.batch_size=abc", "int", "give a value of the key's type"],
            6,
        ),
        "missing_config": (
            train(*with_config(files["missing"])),
            1,
            [f"--config={files['missing']}", "No such file or directory", "experiments/digits.py"],
            6,
        ),
        "config_is_a_directory": (train(*with_config(files["directory"])), 1, ["Is a directory"], 6),
        "config_syntax_error": (
            train(*with_config(files["syntax"])),
            1,
            ["invalid syntax", "syntax_error.py, line 1", "fix the file"],
            6,
        ),
        "unknown_model": (
            train(*BASE, "--config.model.name=nonet"),
            1,
            ["unknown model 'nonet'", "cifar_resnet20", "resnet50"],
            6,
        ),
        "cifar_depth": (train(*BASE, "--config.model.name=cifar_resnet21"), 1, ["cifar_resnet21", "6n+2"], 6),
        "preact_depth": (
            train(*BASE, "--config.model.name=cifar_preact_resnet21"),
            1,
            ["cifar_preact_resnet21", "9n+2"],
            6,
        ),
        "batch_vs_devices": (
            train(*BASE, "--config.batch_size=30"),
            8,
            ["batch_size=30", "8 devices", "multiple of 8"],
            6,
        ),
        "imagenet_tars_missing": (
            train(
                *BASE,
                "--config.dataset.name=imagenet2012",
                f"--config.dataset.data_dir={empty}",
                f"--config.dataset.manual_dir={empty}",
            ),
            1,
            ["imagenet2012", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", f"manual_dir {empty}"],
            1,  # TFDS's "Variant folder ... has no dataset_info.json" warning is dropped
        ),
        "cifar10_missing": (
            ["-c", NO_RETRY_TRAIN, *BASE, "--config.dataset.name=cifar10", f"--config.dataset.data_dir={empty}"],
            1,
            ["cifar10", f"data_dir {empty}", "python -m resnet_jax.prepare cifar10"],
            40,  # TFDS prints its download progress bars before giving up
        ),
        "different_model": (
            train(*BASE, "--config.model.name=cifar_resnet14"),
            1,
            ["different run", "model", "--fresh"],
            6,
        ),
        # Refused before config.json is rewritten: evaluate still reads the run's own config.
        "different_optimizer": (
            train(*BASE, "--config.optimizer=lars"),
            1,
            ["different run", "optimizer differ", "--fresh"],
            6,
        ),
        # Every checkpoint's arrays are gone (see results): no step restores, and nothing is moved
        # or rewritten, config.json included (a changed learning rate would be recorded).
        "all_damaged": (
            train(*BASE, "--config.learning_rate=0.05"),
            1,
            ["no checkpoint in", "can be restored", "pass --fresh"],
            6,
        ),
        "workdir_locked": (train(*BASE), 1, ["in use by another live run"], 6),
    }


def _evaluate_cases(tmp: pathlib.Path, existing: pathlib.Path) -> dict[str, tuple]:
    """name -> (argv, workdir to watch or None, needles)."""
    no_ckpt = tmp / "no_checkpoints"
    no_ckpt.mkdir()
    shutil.copy(existing / "config.json", no_ckpt / "config.json")
    wd = tmp / "evaluated"
    shutil.copytree(existing, wd)
    ev = ["-m", "resnet_jax.evaluate"]
    blocked = tmp / "result_blocked"  # where eval_16.json goes, a directory: the result is printed first
    shutil.copytree(existing, blocked)
    (blocked / "eval_16.json").mkdir()
    return {  # (a missing workdir or config.json, a garbage --checkpoint: before JAX, below)
        "result_unwritable": (
            [*ev, f"--workdir={blocked}"],
            blocked,
            [f"cannot write {blocked / 'eval_16.json'} (Is a directory); the result is the line above"],
        ),
        "no_checkpoints": ([*ev, f"--workdir={no_ckpt}"], no_ckpt, ["no complete checkpoint", "train first"]),
        "bad_checkpoint": (
            [*ev, f"--workdir={wd}", "--checkpoint=7"],
            wd,
            [f"{wd}: no checkpoint at step 7; kept steps: [8, 16]"],
        ),
    }


@pytest.fixture(scope="module")
def results(existing, tmp_path_factory, jax_cache) -> dict:
    """Every case of this module, four processes at a time: the bad-input cases of the trainer
    (each on its own copy of ``existing``), the evaluate cases, and one ``--fresh`` run."""
    tmp = tmp_path_factory.mktemp("cases")
    train_cases = _train_cases(tmp)
    jobs, watch = {}, {}
    for name, (argv, devices, _, _) in train_cases.items():
        wd = tmp / "wd" / name
        shutil.copytree(existing, wd)
        if name == "all_damaged":
            for f in (wd / "checkpoints").rglob("*"):
                if f.is_file() and "ocdbt.process_0" in str(f) and "/d/" in str(f):
                    f.unlink()
        watch[name] = (wd, snapshot(wd))
        jobs[name] = ([*argv, f"--workdir={wd}"], devices)
    # A workdir whose parent is a regular file cannot be created (chmod does not stop root).
    blocked = tmp / "wd" / "workdir_unwritable"
    shutil.copytree(existing, blocked)
    watch["workdir_unwritable"] = (blocked, snapshot(blocked))
    train_cases["workdir_unwritable"] = (None, 1, ["cannot write to workdir", "Not a directory", "choose another"], 6)
    jobs["workdir_unwritable"] = (train(*BASE, f"--workdir={blocked / 'config.json' / 'run'}"), 1)
    evaluate_cases = _evaluate_cases(tmp, existing)
    for name, (argv, wd, _) in evaluate_cases.items():
        jobs[f"evaluate_{name}"] = (argv, 1)
        if wd is not None:
            watch[f"evaluate_{name}"] = (wd, snapshot(wd))
    # --fresh on a workdir of another model configuration (an option that only changes the
    # initialisation, so the compiled train step is shared with the other runs).
    fresh = tmp / "wd" / "fresh"
    shutil.copytree(existing, fresh)
    fresh_before = snapshot(fresh)
    jobs["fresh"] = (train(*BASE, "--config.model.zero_init_last_bn=false", "--fresh", f"--workdir={fresh}"), 1)

    # Another live run holds the lock: this process takes it as the trainer does.
    holder = open(watch["workdir_locked"][0] / ".lock", "a+")  # noqa: SIM115
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = {name: pool.submit(run, jax_cache, argv, devices) for name, (argv, devices) in jobs.items()}
            done = {name: f.result() for name, f in futures.items()}
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    return {
        "done": done,
        "train_cases": train_cases,
        "evaluate_cases": evaluate_cases,
        # (.lock: the pid of the last run that passed the workdir checks, as all_damaged did.)
        "changed": sorted(
            name for name, (wd, before) in watch.items() if {**snapshot(wd), ".lock": 0} != {**before, ".lock": 0}
        ),
        "fresh": (fresh, fresh_before),
    }


def _check(results: dict, cases: dict, prefix: str = "") -> None:
    failures = []
    for name, case in cases.items():
        needles, max_lines = (case[2], case[3]) if len(case) == 4 else (case[2], 6)
        try:
            assert_one_line_error(results["done"][prefix + name], *needles, max_lines=max_lines)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


def test_bad_input_is_one_line_and_leaves_the_workdir_alone(results):
    """Unknown or ill-typed keys, unreadable config files, bad model names and depths, a batch
    the devices cannot split, missing datasets, an unwritable, locked or foreign workdir."""
    _check(results, results["train_cases"])
    assert results["changed"] == []


def test_evaluate_errors_are_one_line(results):
    _check(results, results["evaluate_cases"], prefix="evaluate_")
    assert results["changed"] == []
    printed = json.loads(results["done"]["evaluate_result_unwritable"].stdout.strip().splitlines()[-1])
    assert printed["step"] == 16 and 0 <= printed["eval/top1_acc"] <= 1


def test_fresh_sets_the_old_run_aside(results):
    """The refused case above, with --fresh: the old files move to old-<time>/, untouched (same
    contents and times), and the new run starts from step 0."""
    p = results["done"]["fresh"]
    assert p.returncode == 0, p.stderr[-3000:]
    wd, before = results["fresh"]
    (old,) = [d for d in wd.iterdir() if d.name.startswith("old-")]
    assert snapshot(old) == {k: v for k, v in before.items() if k != ".lock"}  # all but the lock file
    assert json.loads((wd / "config.json").read_text())["model"]["zero_init_last_bn"] is False
    assert json.loads((wd / "run_info.json").read_text())["resumed_from"] == 0
    assert sorted(os.listdir(wd / "checkpoints")) == ["16"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config.nope=1"], "unknown config key 'nope'"),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
        (["--config=experiments/no_such_file.py"], "No such file or directory"),
        ([], "--workdir is required"),
        (["--config.model.name=cifar_resnet21", "--workdir=/nonexistent/wd"], "6n+2"),
        (["--config.model.name=resnet19", "--workdir=/nonexistent/wd"], "unknown depth 19"),
        (["--config.model.shortcut=Q", "--workdir=/nonexistent/wd"], "shortcut='Q'; valid: A, B, C"),
        (["--config.model.bn_momentum=1.5", "--workdir=/nonexistent/wd"], "bn_momentum=1.5"),
        # The run's own keys (resnet_jax.config.check_run_config).
        (["--config.batch_size=0", "--workdir=/nonexistent/wd"], "config.batch_size=0; use a positive"),
        (["--config.seed=-1", "--workdir=/nonexistent/wd"], "config.seed=-1; use an integer in [0, 2**31)"),
        # (jax.random.key wraps seeds above 32 bits; 2**64 and more overflowed with a traceback.)
        (["--config.seed=99999999999999999999", "--workdir=/nonexistent/wd"], "config.seed=99999999999999999999"),
        (["--config.eval_every_epochs=inf", "--workdir=/nonexistent/wd"], "eval_every_epochs=inf; use a finite"),
        (["--config.num_epochs=inf", "--workdir=/nonexistent/wd"], "config.num_epochs=inf; use a finite number"),
        (["--config.warmup_epochs=nan", "--workdir=/nonexistent/wd"], "config.warmup_epochs=nan; use a finite"),
        (["--config.keep_checkpoints=0", "--workdir=/nonexistent/wd"], "config.keep_checkpoints=0; use at least 1"),
        (["--config.eval_every_epochs=-1", "--workdir=/nonexistent/wd"], "config.eval_every_epochs=-1.0"),
        (["--config.label_smoothing=1.5", "--workdir=/nonexistent/wd"], "config.label_smoothing=1.5; use a number in"),
        (["--config.momentum=1", "--workdir=/nonexistent/wd"], "config.momentum=1.0; use a number in [0, 1)"),
        (["--config.weight_decay=-1", "--workdir=/nonexistent/wd"], "config.weight_decay=-1.0; use a non-negative"),
        (["--config.lr_boundaries_steps=(8,x)", "--workdir=/nonexistent/wd"], "lr_boundaries_steps=('(8,x)',)"),
        (
            ["--config.model.bn_group_size=7", "--workdir=/nonexistent/wd"],  # digits: batch 128
            "bn_group_size=7 does not divide config.batch_size=128",
        ),
        # A config file's own error for a variant it does not have, not ml_collections' first line.
        (
            ["--config=experiments/cifar10.py:resnet999", "--workdir=/nonexistent/wd"],
            "cifar10.py:resnet999: use resnet or plain followed by one of (20, 32, 44, 56, 110, 1202)",
        ),
        (["--config=experiments/digits.py:foo", "--workdir=/nonexistent/wd"], "docstring lists its variants"),
        # Choices the trainer would refuse only after JAX started (a sweep, after its earlier runs).
        (["--config.lr_schedule=cosin", "--workdir=/nonexistent/wd"], "config.lr_schedule='cosin'; use one of 'step'"),
        (["--config.optimizer=adam", "--workdir=/nonexistent/wd"], "config.optimizer='adam'; use one of 'sgd', 'lars'"),
        (["--config.warmup_kind=lin", "--workdir=/nonexistent/wd"], "config.warmup_kind='lin'"),
        (["--config.dataset.name=digitz", "--workdir=/nonexistent/wd"], "config.dataset.name='digitz'; use one of"),
        (["--config.dataset.eval_crops=3", "--workdir=/nonexistent/wd"], "config.dataset.eval_crops=3; use 1, or 10"),
        (["--config.trainable=fc", "--workdir=/nonexistent/wd"], "config.trainable='fc'; use one of 'all', 'head'"),
        (
            ["--config.init_from.head=new", "--workdir=/nonexistent/wd"],
            "config.init_from.head='new'; use one of 'auto'",
        ),
        (
            ["--config.init_from.checkpoint=last", "--workdir=/nonexistent/wd"],
            "config.init_from.checkpoint='last'; use 'latest', 'best' or a step number",
        ),
        # pathlib would make gs://b/run a local folder gs:/b/run (then TensorBoard's writer failed).
        (["--workdir=gs://bucket/run"], "--workdir=gs://bucket/run: a workdir must be a filesystem path"),
        (
            ["--workdir=/nonexistent/wd", "--coordinator_address=localhost:1", "--num_processes=0", "--process_id=5"],
            "--num_processes=0 --process_id=5: use N >= 1 processes, numbered 0 to N-1",
        ),
    ],
)
def test_command_line_errors_come_before_jax_is_imported(tmp_path, args, needle):
    """The trainer checks its command line, the model's name and options included, before it
    imports JAX, Flax or Orbax (a typo is answered in a fraction of a second): here those
    packages are made unimportable."""
    p = run_without_jax(tmp_path, ["-m", "resnet_jax.train", "--config=experiments/digits.py", *args])
    assert_one_line_error(p, needle, max_lines=1)


def test_a_config_file_without_a_base_key_is_one_line(tmp_path):
    """A config that dropped a key of the base config (``del c["trainable"]``) is refused naming
    it, not with a KeyError from deep inside the checks."""
    exp = tmp_path / "exp.py"
    exp.write_text(
        "from experiments.digits import get_config as base\n"
        "def get_config():\n    c = base()\n    del c['trainable']\n    return c\n"
    )
    p = run_without_jax(tmp_path, ["-m", "resnet_jax.train", f"--config={exp}", "--workdir=/nonexistent/wd"])
    assert_one_line_error(p, "config.trainable is missing; build the config on resnet_jax.config.get_base_config()")


def run_without_jax(tmp_path: pathlib.Path, argv: list[str], **env_vars: str) -> subprocess.CompletedProcess:
    """``python argv`` with JAX, Flax, Orbax and TensorFlow made unimportable (and ``env_vars`` set)."""
    hidden = tmp_path / "hidden"
    for name in ("jax", "flax", "orbax", "tensorflow"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    env = dict(os.environ, PYTHONPATH=f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_vars)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing_workdir", ["does not exist"]),
        ("not_a_run", ["config.json not found", "of a training run"]),
        ("garbage_checkpoint", ["--checkpoint='banana'", "'latest', 'best'"]),
        ("eval_image_size_on_cifar", ["--eval_image_size=320", "for an imagenet2012 run", "cifar10"]),
        ("zero_eval_image_size", ["--eval_image_size=0", "give a positive size"]),
    ],
)
def test_evaluate_errors_come_before_jax_is_imported(tmp_path, case, needles):
    """evaluate checks its workdir (it exists, it holds a run's config.json) and the form of
    --checkpoint before it imports JAX (test_evaluate_errors_are_one_line: what needs the
    checkpoints)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if case != "not_a_run":
        dataset = "imagenet2012" if case == "zero_eval_image_size" else "cifar10"  # a size is for ImageNet
        run_config = {"model": {"name": "cifar_resnet8"}, "dataset": {"name": dataset}}
        (run_dir / "config.json").write_text(json.dumps(run_config))
    workdir = tmp_path / "nowhere" if case == "missing_workdir" else run_dir
    checkpoint = "banana" if case == "garbage_checkpoint" else "latest"
    extra = {"eval_image_size_on_cifar": ["--eval_image_size=320"], "zero_eval_image_size": ["--eval_image_size=0"]}
    extra = extra.get(case, [])
    argv = ["-m", "resnet_jax.evaluate", f"--workdir={workdir}", f"--checkpoint={checkpoint}", *extra]
    p = run_without_jax(tmp_path, argv)
    assert_one_line_error(p, *needles, max_lines=1)


@pytest.mark.parametrize("tool", ["train", "evaluate", "demo"])
def test_xla_flags_that_xla_would_drop_are_refused_before_jax(tmp_path, tool):
    """XLA silently drops every XLA_FLAGS flag after a word that is not a flag (here the device
    count would be set and --xla_cpu_use_thunk_runtime dropped): the tools refuse such an
    environment, before JAX is imported and before anything is written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"model": {"name": "cifar_resnet8"}}))
    argv = {
        "train": ["-m", "resnet_jax.train", "--config=experiments/digits.py", f"--workdir={tmp_path / 'new'}"],
        "evaluate": ["-m", "resnet_jax.evaluate", f"--workdir={run_dir}"],
        "demo": ["-m", "resnet_jax.demo", f"--workdir={tmp_path / 'new'}"],
    }[tool]
    xla_flags = "--xla_force_host_platform_device_count=2 typo --xla_cpu_use_thunk_runtime=false"
    p = run_without_jax(tmp_path, argv, XLA_FLAGS=xla_flags)
    assert_one_line_error(p, f"XLA_FLAGS={xla_flags}: 'typo' is not an XLA flag", max_lines=1)
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(run_dir)) == ["config.json"]


def test_xla_flags_problem_accepts_flags_and_a_flag_file(tmp_path):
    from resnet_jax.cli import xla_flags_problem

    flag_file = tmp_path / "xla.flags"
    flag_file.write_text("--xla_force_host_platform_device_count=2\n")
    assert xla_flags_problem("") is None
    assert xla_flags_problem(" --xla_a=1  --xla_b=2 ") is None
    assert xla_flags_problem(str(flag_file)) is None  # XLA's flag-file form
    assert "'missing.flags' is not an XLA flag" in xla_flags_problem("missing.flags")
    assert xla_flags_problem(str(tmp_path)) is not None  # a directory is no flag file
    # The first word after which XLA drops the flags is the one named.
    assert "'typo' is not an XLA flag" in xla_flags_problem("--xla_a=1 typo other --xla_b=2")
    # --xla_flags is appended to XLA_FLAGS, where a file name would no longer be read as one.
    assert f"{str(flag_file)!r} is not an XLA flag" in xla_flags_problem(str(flag_file), "--xla_flags", flag_file=False)


def test_first_line_and_describe_give_one_bounded_line():
    from resnet_jax.errors import describe, first_line

    multi = ValueError("\n  \n  the cause  \n  a long tree of detail\n")
    assert first_line(multi) == "the cause"
    assert describe(multi) == "ValueError: the cause"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(), default="bad input") == "bad input"
    assert describe(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("x" * 50), limit=10) == "xxxxxxx..."
    assert first_line(ValueError("x" * 10), limit=10) == "x" * 10


@pytest.mark.parametrize("name", ["checkpoints", "checkpoints-damaged"])
def test_a_file_where_the_checkpoints_go_is_refused_before_anything_is_written(tmp_path, name):
    """Found by hand: with a regular file named ``checkpoints``, the run wrote config.json,
    run_info.json and metrics before Orbax failed with a traceback."""
    from resnet_jax.errors import UserError
    from resnet_jax.workdir import Workdir

    (tmp_path / name).write_text("not a directory")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(tmp_path)
    wd = Workdir(tmp_path)
    with pytest.raises(UserError, match=f"{name} is a file, not the run's checkpoint directory; move it away"):
        wd.open({"model": {"name": "cifar_resnet8"}})
    wd.close()
    assert {k: v for k, v in snapshot(tmp_path).items() if k != ".lock"} == before


def test_a_workdir_is_held_by_one_open_run_at_a_time(tmp_path):
    """The lock is exclusive: a second open of a held workdir is refused with one line, also for
    a process holding only a shared lock (a reader), and the workdir opens again once closed."""
    import fcntl

    from resnet_jax.config import get_base_config
    from resnet_jax.errors import UserError
    from resnet_jax.workdir import LOCK_FILE, Workdir

    config = get_base_config().to_dict()
    first = Workdir(tmp_path)
    first.open(config, write=False)
    with pytest.raises(UserError, match="is in use by another live run"):
        Workdir(tmp_path).open(config, write=False)
    first.close()
    with open(tmp_path / LOCK_FILE) as reader:
        fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="is in use by another live run"):
            Workdir(tmp_path).open(config, write=False)
    again = Workdir(tmp_path)
    again.open(config, write=False)
    again.close()


def test_resuming_compares_the_identity_keys_with_their_defaults(tmp_path):
    """A run recorded before newer keys existed (its config.json lacks them) resumes with a
    config that has them at their defaults; a changed identity key (trainable: another optimizer
    state) is refused, naming it."""
    from resnet_jax.config import get_base_config
    from resnet_jax.errors import UserError
    from resnet_jax.workdir import Workdir

    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    config = get_base_config().to_dict()
    older = {k: v for k, v in config.items() if k not in ("init_from", "trainable")}
    older["model"] = {k: v for k, v in config["model"].items() if k != "space_to_depth_stem"}
    (tmp_path / "config.json").write_text(json.dumps(older))
    wd = Workdir(tmp_path)
    wd.open(config, write=False)
    wd.close()
    with pytest.raises(UserError, match=r"holds checkpoints of a different run \(trainable differ\)"):
        Workdir(tmp_path).open({**config, "trainable": "head"}, write=False)
    with pytest.raises(UserError, match=r"\(model differ\)"):
        Workdir(tmp_path).open({**config, "model": {**config["model"], "space_to_depth_stem": True}}, write=False)
    with pytest.raises(UserError, match=r"\(optimizer differ\)"):  # (SGD's and LARS's states differ)
        Workdir(tmp_path).open({**config, "optimizer": "lars"}, write=False)
    with pytest.raises(UserError, match=r"\(dataset.name differ\)"):  # the same shapes, another dataset
        Workdir(tmp_path).open({**config, "dataset": {**config["dataset"], "name": "cifar100"}}, write=False)
    # Other settings may change; open reports them (the trainer warns and keeps their history).
    wd = Workdir(tmp_path)
    wd.open({**config, "batch_size": 64, "progress_bar": False}, write=False)
    wd.close()
    assert wd.changed_settings == {"batch_size": (config["batch_size"], 64)}  # progress_bar: quiet
    wd = Workdir(tmp_path)  # remat: the same function and parameters, not another model
    wd.open({**config, "model": {**config["model"], "remat": True}}, write=False)
    wd.close()
    assert wd.changed_settings == {}
    # init_from is not read on resume: no change to report. A config.json from when scan_blocks
    # was a string field ("true") is the same network as --config.model.scan_blocks=true now.
    init_from = {**config["init_from"], "path": "/elsewhere"}
    wd = Workdir(tmp_path)
    wd.open({**config, "init_from": init_from}, write=False)
    wd.close()
    assert wd.changed_settings == {}
    (tmp_path / "config.json").write_text(json.dumps({**older, "model": {**older["model"], "scan_blocks": "true"}}))
    wd = Workdir(tmp_path)
    wd.open({**config, "model": {**config["model"], "scan_blocks": True}}, write=False)
    wd.close()
    # --fresh: the new config.json is written at once (a start that fails later leaves a run's
    # directory, not only old-<time>/).
    wd = Workdir(tmp_path)
    wd.open({**config, "trainable": "head"}, fresh=True, write=False)
    wd.close()
    assert json.loads((tmp_path / "config.json").read_text())["trainable"] == "head"


def test_another_runs_outputs_without_checkpoints_are_refused_too(tmp_path):
    """metrics, event files or results of another model, whose checkpoints were removed, are not
    silently mixed with a new run's (metrics.jsonl truncated, old eval files kept); the same
    run's outputs without a checkpoint (stopped before its first) start it over."""
    from resnet_jax.config import get_base_config
    from resnet_jax.errors import UserError
    from resnet_jax.workdir import Workdir

    config = get_base_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    other = {**config, "model": {**config["model"], "name": "resnet18"}}
    wd = Workdir(tmp_path)
    wd.open(other, write=False)  # nothing but a config: nothing to mix
    wd.close()
    for output in ("metrics.jsonl", "eval_90.json", "events.out.tfevents.1.host"):
        (tmp_path / output).write_text("{}\n")
        with pytest.raises(UserError, match=r"holds the outputs of a different run \(model differ\).*--fresh"):
            Workdir(tmp_path).open(other, write=False)
        wd = Workdir(tmp_path)
        wd.open(config, write=False)
        wd.close()
        (tmp_path / output).unlink()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-m", "resnet_jax.demo", "--num_steps=x"], "--num_steps=x"),
        (["-m", "resnet_jax.evaluate", "--checkpoints=best"], "Unknown command line flag 'checkpoints'"),
        (["-m", "resnet_jax.sweep"], "required: sweep"),
        (
            ["-m", "resnet_jax.sweep", "experiments/sweep_cifar10.py", "--seeds=two"],
            "--seeds: invalid int value: 'two'",
        ),
    ],
)
def test_bad_flags_of_the_other_tools_are_one_line(argv, needle):
    """absl's own handling prints "FATAL Flags parsing error" with a hint and exits 1, argparse's a
    usage block: the tools print one ``error:`` line and exit 2 as the trainer does."""
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=60)
    assert_one_line_error(p, needle, "(see --help)", max_lines=1)


def in_process_error(capsys, main, argv: list[str], *needles: str) -> str:
    """``main(argv)`` of a tool, in this process: one ``error:`` line and exit status 2 (returned
    or raised as SystemExit); an exception (a traceback for a user) fails the test."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return assert_one_line_error(
        subprocess.CompletedProcess(argv, code, captured.out, captured.err), *needles, max_lines=1
    )


SWEEP_FILES = {
    "syntax_error": ("def get_sweep(:\n    return []\n", ["invalid syntax", "line 1", "fix the file"]),
    "returns_none": ("def get_sweep():\n    return None\n", ["get_sweep() returned None", "not a list"]),
    "returns_ints": ("def get_sweep():\n    return [1, 2]\n", ["run 0 of get_sweep() is 1, not a dict"]),
    "overrides_list": (
        "def get_sweep():\n    return [dict(name='a', config='experiments/digits.py', overrides=['x=1'])]\n",
        ["run 'a' has overrides of type list", "dict"],
    ),
    "failing_import": (
        "import no_such_module_xyz\n\ndef get_sweep():\n    return []\n",
        ["cannot load sweep file", "ModuleNotFoundError", "no_such_module_xyz"],
    ),
    "get_sweep_raises": ("def get_sweep():\n    return {}['k']\n", ["get_sweep() failed: KeyError: 'k'"]),
    "no_get_sweep": ("x = 1\n", ["defines no get_sweep()"]),
    "no_runs": ("def get_sweep():\n    return []\n", ["defines no runs"]),
}


@pytest.mark.parametrize("case", sorted(SWEEP_FILES))
def test_sweep_broken_sweep_file_is_one_line(tmp_path, capsys, case):
    """A sweep file that does not parse, import or return a list of run dicts: one line naming the
    file and what is wrong (before: tracebacks; a KeyError inside get_sweep was reported as "defines
    no get_sweep()", and no runs at all exited 0)."""
    from resnet_jax import sweep

    text, needles = SWEEP_FILES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(text)
    in_process_error(capsys, sweep.main, [str(path), "--root", str(tmp_path / "r"), "--dry_run"], str(path), *needles)
    assert not (tmp_path / "r").exists()


GOOD_SWEEP = "def get_sweep():\n    return [dict(name='a', config='experiments/digits.py')]\n"


def test_sweep_garbage_run_info_is_one_line(tmp_path, capsys):
    from resnet_jax import sweep

    (tmp_path / "good.py").write_text(GOOD_SWEEP)
    info = tmp_path / "r" / "a" / "seed0" / "run_info.json"
    info.parent.mkdir(parents=True)
    info.write_text('{"bad"')
    before = tree(tmp_path)
    argv = [str(tmp_path / "good.py"), "--root", str(tmp_path / "r")]
    in_process_error(capsys, sweep.main, argv, str(info), "not readable JSON", "move it away")
    assert tree(tmp_path) == before


def test_sweep_refuses_xla_flags_that_xla_would_drop_before_any_run(tmp_path, capsys, monkeypatch):
    from resnet_jax import sweep

    (tmp_path / "good.py").write_text(GOOD_SWEEP)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 2")
    argv = [str(tmp_path / "good.py"), "--root", str(tmp_path / "r")]
    in_process_error(capsys, sweep.main, argv, "XLA_FLAGS=", "'2' is not an XLA flag")
    assert sorted(os.listdir(tmp_path)) == ["good.py"]


@pytest.mark.parametrize(
    "case, needles",
    [
        ("slurm_under_a_file", ["--slurm", "a_file is a file, not a directory"]),
        ("root_is_a_file", ["--root", "a_file is a file, not a directory"]),
        ("root_under_a_file", ["--root", "is under", "a_file, a file"]),
    ],
)
def test_sweep_output_paths_are_checked_before_anything_is_created(tmp_path, capsys, case, needles):
    """Before: FileNotFoundError or NotADirectoryError tracebacks, after ROOT/slurm_logs was made."""
    from resnet_jax import sweep

    (tmp_path / "good.py").write_text(GOOD_SWEEP)
    (tmp_path / "a_file").write_text("mine")
    argv = {
        "slurm_under_a_file": ["--root", str(tmp_path / "r"), f"--slurm={tmp_path / 'a_file' / 'x.sbatch'}"],
        "root_is_a_file": ["--root", str(tmp_path / "a_file"), f"--slurm={tmp_path / 'x.sbatch'}"],
        "root_under_a_file": ["--root", str(tmp_path / "a_file" / "sub")],
    }[case]
    before = tree(tmp_path)
    in_process_error(capsys, sweep.main, [str(tmp_path / "good.py"), *argv], *needles)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "overrides, extra, needles",
    [
        ("", ["--config.nope=1"], ["run 'a'", "unknown config key 'nope'", "--config.nope"]),
        (", overrides={'model.name': 'nonet'}", [], ["run 'a'", "unknown model 'nonet'"]),
        # A seed would give every seed<k> directory the same run (it came after --config.seed=k).
        (", overrides={'seed': 7}", [], ["run 'a' overrides 'seed'", "--seeds"]),
        ("", ["--", "--config.seed=7"], ["--config.seed=7: the sweep sets each run's seed"]),
    ],
)
def test_sweep_checks_the_overrides_once_before_jax(tmp_path, overrides, extra, needles):
    """A bad override stops the sweep with one line before any run starts (before: every run was
    launched, and each failed), without importing JAX."""
    path = tmp_path / "sweep.py"
    path.write_text(f"def get_sweep():\n    return [dict(name='a', config='experiments/digits.py'{overrides})]\n")
    p = run_without_jax(tmp_path, ["-m", "resnet_jax.sweep", str(path), f"--root={tmp_path / 'r'}", *extra])
    assert_one_line_error(p, *needles, max_lines=1)
    assert p.stdout == "" and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "case, needles",
    [
        ("markdown_binary", ["not a text file", "--json"]),
        ("markdown_metrics", ["no bench results", "metrics.jsonl"]),
        ("peak_tflops_negative", ["--peak_tflops=-1.0", "> 0"]),
        ("peak_tflops_zero", ["--peak_tflops=0.0", "> 0"]),
    ],
)
def test_bench_bad_markdown_files_and_peak_are_one_line(tmp_path, capsys, monkeypatch, case, needles):
    """Before: a UnicodeDecodeError traceback, an empty table with exit 0, a negative MFU."""
    from resnet_jax import bench

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # prepare_environment may rewrite it
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.3}\n{"step": 2, "eval/top1_acc": 0.1}\n')
    argv = {
        "markdown_binary": ["--markdown", str(tmp_path / "binary.jsonl")],
        "markdown_metrics": ["--markdown", str(tmp_path / "metrics.jsonl")],
        "peak_tflops_negative": ["--model=cifar_resnet8", "--peak_tflops=-1"],
        "peak_tflops_zero": ["--model=cifar_resnet8", "--peak_tflops=0"],
    }[case]
    in_process_error(capsys, bench.main, argv, *needles)


@pytest.mark.parametrize(
    "case, needles",
    [
        ("out_under_a_file", ["--out", "is under", "a_file, a file, not a directory"]),
        ("pth_is_text", ["text.pth is not a PyTorch file saved with torch.save"]),
        ("pth_is_a_directory", ["a_dir.pth is a directory"]),
    ],
)
def test_convert_bad_out_and_pth_are_one_line(tmp_path, capsys, case, needles):
    """Before: a NotADirectoryError traceback (after the .pth was read), "cannot read ...: 101" for a
    text file, and "no such file" for a directory. No torch import is needed for these answers
    (torch must be installed, as the test extras do: without it the answer is "needs torch")."""
    from resnet_jax.convert import main as convert_main

    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "text.pth").write_text("hello, not a state_dict\n")
    (tmp_path / "a_dir.pth").mkdir()
    pth, out = {
        "out_under_a_file": ("text.pth", "a_file/sub"),
        "pth_is_text": ("text.pth", "out"),
        "pth_is_a_directory": ("a_dir.pth", "out"),
    }[case]
    before = tree(tmp_path)
    argv = ["--model", "resnet18", "--pth", str(tmp_path / pth), "--out", str(tmp_path / out)]
    in_process_error(capsys, convert_main, argv, *needles)
    assert tree(tmp_path) == before


def test_a_metrics_file_that_cannot_be_appended_to_is_one_line(tmp_path):
    """A full disk (here: metrics.jsonl replaced by a directory mid-run) stops the run with one
    line naming the file and the step, not an OSError traceback."""
    from resnet_jax.errors import UserError
    from resnet_jax.logbook import Logbook

    book = Logbook(tmp_path)
    book.write(1, {"train/loss": 1.0})
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match=r"cannot append to .*metrics.jsonl at step 2 \(Is a directory\)"):
        book.write(2, {"train/loss": 0.5})
    book.close()
