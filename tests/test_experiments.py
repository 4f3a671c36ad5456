"""Every experiment config loads, documents itself, and builds a valid model; sweeps run and resume."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from cli_env import user_env, write_metrics
from ml_collections import config_flags

from resnet_jax import sweep
from resnet_jax.cli import experiment_config
from resnet_jax.config import check_run_config, model_options
from resnet_jax.errors import UserError
from resnet_jax.models import resolve_options

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"

CONFIGS = [
    "digits.py",
    "degradation_digits.py",
    *[f"cifar10.py:{k}{d}" for k in ("plain", "resnet") for d in (20, 32, 44, 56, 110)],
    "cifar10.py:resnet1202",
    *[
        f"imagenet_paper.py:{n}"
        for n in (
            "plain18",
            "plain34",
            "resnet18_A",
            "resnet34_A",
            "resnet34_B",
            "resnet34_C",
            "resnet50",
            "resnet101",
            "resnet152",
        )
    ],
    *[f"imagenet_preact.py:{n}" for n in ("resnet152", "resnet200", "preact_resnet152", "preact_resnet200")],
    "imagenet_modern.py:resnet50",
    "imagenet_modern.py:resnet50:lars",
    *[
        f"preact_shortcuts.py:{v}"
        for v in ("original", "constant_scaling", "exclusive_gating", "shortcut_gating", "conv_shortcut")
    ],
    *[f"cifar_preact.py:{d}:{ds}" for d in (164, 1001) for ds in ("cifar10", "cifar100")],
    *[f"cifar_preact.py:{d}:{ds}:original" for d in (164, 1001) for ds in ("cifar10", "cifar100")],
]


def load(spec: str):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(["prog", f"--config={EXPERIMENTS / spec}"])
    return fv.config


@pytest.mark.parametrize("spec", CONFIGS)
def test_config_is_valid(spec):
    """The config loads, its model options and run keys validate, and its docstring has a command
    and a target."""
    c = load(spec)
    resolve_options(c.model.name, **{k: v for k, v in model_options(c).items()})
    check_run_config(c)
    doc = (EXPERIMENTS / spec.split(":")[0]).read_text().split('"""')[1]
    assert "python -m resnet_jax" in doc and "Expected" in doc and "Compute" in doc


def test_scan_blocks_takes_a_bool_in_a_config_file_and_on_the_command_line(tmp_path):
    """A config file writes ``scan_blocks = True``; the command line's true/false and the strings
    of an older config.json mean the same."""
    exp = tmp_path / "exp.py"
    exp.write_text(
        "from resnet_jax.config import get_base_config\n"
        "def get_config():\n    c = get_base_config()\n    c.model.scan_blocks = True\n    return c\n"
    )
    assert model_options(experiment_config(str(exp)))["scan_blocks"] is True
    assert model_options(experiment_config(str(exp), "--config.model.scan_blocks=false"))["scan_blocks"] is False
    c = load("digits.py")
    for old, new in (("true", True), ("False", False), ("auto", "auto"), ("yes", "yes")):
        c.model.scan_blocks = old
        assert model_options(c)["scan_blocks"] == new
    with pytest.raises(ValueError, match=r"scan_blocks='yes'; valid: 'auto', True, False"):
        resolve_options(c.model.name, **model_options(c))


def test_recipes_match_the_papers():
    """Spot checks against paper 1's recipes."""
    c = load("cifar10.py:resnet110")
    assert (c.batch_size, c.num_steps, tuple(c.lr_boundaries_steps), c.weight_decay) == (
        128,
        64000,
        (32000, 48000),
        1e-4,
    )
    assert c.learning_rate * c.batch_size / 256 == pytest.approx(0.1)
    assert (c.warmup_steps, c.warmup_kind, c.warmup_lr_factor) == (400, "constant", 0.1)
    assert c.model.shortcut is None and c.model.name == "cifar_resnet110"  # family default: option A
    assert load("cifar10.py:resnet56").warmup_steps == -1
    assert load("imagenet_paper.py:resnet34_C").model.shortcut == "C"
    assert load("preact_shortcuts.py:exclusive_gating").model.gate_bias_init == -6.0
    # Paper 2's CIFAR code (KaimingHe/resnet-1k-layers) strides the first 1x1 of a bottleneck.
    assert load("cifar_preact.py:1001:cifar100").model.stride_in == "1x1"
    assert load("cifar_preact.py:164:cifar10:original").model.stride_in == "1x1"
    # The modern recipe is the Flax ImageNet example's optimiser: Nesterov momentum 0.9, and its
    # penalty 1e-4 * 0.5 * sum(w**2) over the kernels, i.e. a decay of 1e-4 off BN and biases.
    c = load("imagenet_modern.py:resnet50")
    assert (c.nesterov, c.momentum, c.weight_decay, c.decay_bn_and_bias) == (True, 0.9, 1e-4, False)
    assert c.learning_rate * c.batch_size / 256 == pytest.approx(0.4) and c.label_smoothing == 0.1


@pytest.mark.parametrize("name", ["sweep_cifar10.py", "sweep_preact.py"])
def test_shipped_sweeps_name_configs_that_load(name):
    """Every run of a shipped sweep names a config (and variant) this file checks, under a name of
    its own; paper 2's sweep runs each pre-activation net beside its original counterpart."""
    runs = sweep.load_sweep(str(EXPERIMENTS / name))
    assert len({r["name"] for r in runs}) == len(runs)
    assert {r["config"].removeprefix("experiments/") for r in runs} <= set(CONFIGS)
    if name == "sweep_preact.py":
        specs = {r["config"] for r in runs}
        for d in (164, 1001):
            for ds in ("cifar10", "cifar100"):
                assert {
                    f"experiments/cifar_preact.py:{d}:{ds}",
                    f"experiments/cifar_preact.py:{d}:{ds}:original",
                } <= specs


def test_a_python_built_config_with_an_unknown_key_is_refused(tmp_path):
    """The command line's config is locked; one built in Python is not, so train_and_evaluate
    checks its keys: a typo is named (with the key meant) before anything is written."""
    from resnet_jax.config import get_base_config
    from resnet_jax.train import train_and_evaluate

    c = get_base_config()
    c.num_step = 20
    with pytest.raises(UserError, match=r"config.num_step is not a config key; did you mean config.num_steps\?"):
        train_and_evaluate(c, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
    c = get_base_config()
    c.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="the compute dtype is config.half_precision"):
        check_run_config(c)


def test_bad_config_argument():
    """The config's own ValueError (not just the repeated path) reaches the flag's error."""
    msg = "experiments/cifar10.py:resnet21: use resnet or plain followed by one of (20, 32, 44, 56, 110, 1202)"
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(msg)):
        load("cifar10.py:resnet21")


def write_sweep(tmp_path) -> pathlib.Path:
    path = tmp_path / "sweep_tiny.py"
    path.write_text(
        "def get_sweep():\n"
        "    return [dict(name='tiny', config='experiments/digits.py',\n"
        "                 overrides={'model.name': 'cifar_resnet8', 'num_steps': 2, 'batch_size': 32,\n"
        "                            'progress_bar': False, 'plot_curves': False, 'eval_every_epochs': 100.0})]\n"
    )
    return path


def test_sweep_runs_and_skips_finished(tmp_path):
    """A run trains in its own seed workdir; started again with two seeds, the sweep skips the
    finished run and would run only the new seed."""
    path, root = write_sweep(tmp_path), tmp_path / "runs"
    env = user_env()
    cmd = [sys.executable, "-m", "resnet_jax.sweep", str(path), "--root", str(root)]
    p = subprocess.run([*cmd, "--seeds", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sweep.finished(root / "tiny" / "seed0")
    assert '"seed": 0' in (root / "tiny" / "seed0" / "config.json").read_text()
    p = subprocess.run(
        [*cmd, "--seeds", "2", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finished, skipped") == 1 and "--config.seed=1" in p.stdout
    assert not (root / "tiny" / "seed1").exists()


def test_a_run_is_finished_only_with_its_final_checkpoint_and_final_eval(tmp_path):
    """sweep.finished: an eval row at run_info's total_steps and the checkpoint of that step; an
    eval before the last step, or a last eval whose checkpoint save was cut short, is unfinished."""
    wd = tmp_path / "run"
    (wd / "checkpoints" / "8").mkdir(parents=True)
    (wd / "run_info.json").write_text(json.dumps({"total_steps": 8}))

    def metrics(*eval_steps):
        rows = [{"step": s, "eval/top1_acc": 0.5} for s in eval_steps]
        write_metrics(wd, rows)

    metrics(4, 8)
    assert sweep.finished(wd)
    metrics(4)
    assert not sweep.finished(wd)
    metrics(4, 8)
    (wd / "checkpoints" / "8").rename(wd / "checkpoints" / "4")
    assert not sweep.finished(wd)
    assert not sweep.finished(tmp_path / "missing")


def test_sweep_stops_at_a_run_refused_for_bad_input(tmp_path):
    """A run the trainer refuses (exit 2; here a regular file where its checkpoints go) stops the
    sweep with one line naming it: the next run is not started."""
    path, root = write_sweep(tmp_path), tmp_path / "runs"
    text = path.read_text().replace("return [dict(name='tiny'", "return [dict(name='first'", 1)
    path.write_text(text.replace("})]", "}), dict(name='second', config='experiments/digits.py')]"))
    (root / "first" / "seed0").mkdir(parents=True)
    (root / "first" / "seed0" / "checkpoints").write_text("not a directory")
    cmd = [sys.executable, "-m", "resnet_jax.sweep", str(path), "--root", str(root)]
    p = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: [1/2]") and "was refused" in last and "start the sweep again" in last, p.stderr
    assert "is a file, not the run's checkpoint directory" in p.stderr
    assert not (root / "second").exists() and "[2/2]" not in p.stdout


def test_ctrl_c_stops_a_sweep_after_its_run_saved(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the sweep's whole process group) while a run trains: the
    run saves a checkpoint and exits, the sweep stops with one line and status 130, no traceback,
    no process left (resuming from such a checkpoint: test_reliability)."""
    path, root = write_sweep(tmp_path), tmp_path / "runs"
    path.write_text(path.read_text().replace("'num_steps': 2", "'num_steps': 100000"))
    cmd = [sys.executable, "-m", "resnet_jax.sweep", str(path), "--root", str(root)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = root / "tiny" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.5)  # training has started: the first logged steps are in
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT during [1/1]") and "start the sweep again" in last, err[-3000:]
    saved = [int(d.name) for d in (root / "tiny" / "seed0" / "checkpoints").iterdir() if d.name.isdigit()]
    assert saved and "saving at the next step boundary" in err
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the whole group (the run too) has exited


def test_sweep_refuses_a_run_directory_of_other_settings(tmp_path, capsys):
    """Edited after it ran, a sweep does not skip (or resume) its old runs as if they were the new
    ones: a directory whose config.json differs in a key that changes the result is refused,
    before any run starts and without touching it."""
    path, root = write_sweep(tmp_path), tmp_path / "runs"
    wd = root / "tiny" / "seed0"
    wd.mkdir(parents=True)
    configs = sweep.check_overrides(sweep.load_sweep(str(path)), [])
    old = {**configs["tiny"], "seed": 0, "num_steps": 50, "progress_bar": True}
    (wd / "config.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit) as e:
        sweep.main([str(path), "--root", str(root), "--dry_run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert "holds a run of other settings (num_steps: 50 -> 2)" in err and "progress_bar" not in err
    assert sorted(os.listdir(wd)) == ["config.json"]
    (wd / "config.json").write_text(json.dumps({**old, "num_steps": 2}))  # only a logging key differs
    assert sweep.main([str(path), "--root", str(root), "--dry_run"]) == 0
    # Recorded before init_from existed: the same settings (the key's default), not another run.
    older = {k: v for k, v in {**old, "num_steps": 2}.items() if k != "init_from"}
    (wd / "config.json").write_text(json.dumps(older))
    assert sweep.main([str(path), "--root", str(root), "--dry_run"]) == 0
    (wd / "config.json").write_text(json.dumps({**older, "init_from": {**old["init_from"], "path": "/elsewhere"}}))
    with pytest.raises(SystemExit):
        sweep.main([str(path), "--root", str(root), "--dry_run"])
    assert 'init_from.path: "/elsewhere" -> null' in capsys.readouterr().err
    # remat leaves the result and the checkpoints' layout alone; scan_blocks changes the layout, which
    # the trainer refuses on resume, so the sweep refuses it up front rather than at that run.
    same_model = {**older, "model": {**old["model"], "remat": not old["model"]["remat"]}}
    (wd / "config.json").write_text(json.dumps(same_model))
    assert sweep.main([str(path), "--root", str(root), "--dry_run"]) == 0
    (wd / "config.json").write_text(json.dumps({**older, "model": {**old["model"], "scan_blocks": True}}))
    with pytest.raises(SystemExit):
        sweep.main([str(path), "--root", str(root), "--dry_run"])
    assert 'model.scan_blocks: true -> "auto"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, needle",
    [("{'shortcut': 'B'}", "has a dict for override 'model'"), ("None", "sets 'model' to None; leave the key out")],
)
def test_sweep_refuses_dict_and_none_overrides(tmp_path, capsys, value, needle):
    path = tmp_path / "s.py"
    path.write_text(
        f"def get_sweep():\n    return [dict(name='a', config='experiments/digits.py', overrides={{'model': {value}}})]\n"
    )
    with pytest.raises(SystemExit) as e:
        sweep.main([str(path), "--root", str(tmp_path / "r"), "--dry_run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and "\n" not in err


def test_sweep_writes_slurm_array(tmp_path, capsys):
    """The script's directory is created; its commands run from here with this Python (the
    relative config and workdir paths resolve wherever it is submitted from)."""
    path = write_sweep(tmp_path)
    out = tmp_path / "new" / "sweep.sbatch"
    assert sweep.main([str(path), "--seeds", "3", "--root", str(tmp_path / "r"), "--slurm", str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --array=0-2" in text and text.count("resnet_jax.train") == 3 and "--config.seed=2" in text
    assert f"cd {os.getcwd()}\n" in text and text.count(sys.executable) == 3
    assert "#SBATCH --signal=TERM@120" in text and "#SBATCH --requeue\n" in text  # preemption: save, requeue
    # The signal reaches job steps only (not the batch shell's own children): the run is one.
    assert 'eval "srun ${CMDS[$SLURM_ARRAY_TASK_ID]}"' in text
    assert f"#SBATCH --output={(tmp_path / 'r' / 'slurm_logs').absolute()}/" in text
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # never overwrite: a usage error (2), the file as it was
        sweep.main([str(path), "--seeds", "1", "--root", str(tmp_path / "r"), "--slurm", str(out)])
    assert e.value.code == 2 and "exists; choose another --slurm path" in capsys.readouterr().err
    assert out.read_text() == text


def test_the_slurm_script_runs_each_command_as_written(tmp_path):
    """Each array task's srun gets exactly its job's argv, overrides included: paths with spaces
    survive the bash array and its eval (run here with a stand-in srun that prints its argv)."""
    runs = [{"name": "a b", "config": "experiments/digits.py", "overrides": {"model.name": "cifar_resnet8"}}]
    jobs = sweep.expand(runs, 2, str(tmp_path / "root dir"), ["--config.num_steps=3"])
    assert "--config.model.name=cifar_resnet8" in jobs[1][1]
    script = tmp_path / "s.sbatch"
    script.write_text(sweep.slurm_script(jobs, tmp_path / "logs"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (fake / "srun").chmod(0o755)
    for task in (0, 1):
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task)}
        p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and json.loads(p.stdout) == jobs[task][1], (p.stdout, p.stderr)


# A stand-in run: says when it is ready; on SIGTERM writes "saved" and exits 0, as the trainer does.
_RUN = """import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    out.write_text("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
out.with_suffix(".ready").write_text("")
time.sleep(30)
out.write_text("not stopped")
"""
# The sweep's side, in a process of its own (so that a SIGTERM it does not handle kills it, not pytest).
_SWEEP = """import sys
from resnet_jax import sweep
print(*sweep.run_job([sys.executable, "-c", sys.argv[1], sys.argv[2]]))
"""


def test_run_job_passes_a_sigterm_to_the_sweep_alone_on_to_its_run(tmp_path):
    """A SIGTERM to the sweep's process only (scancel of the sweep, a preemption notice; not to its
    process group, as Ctrl-C is) reaches the running run as SIGTERM: the run saves and exits, and
    run_job reports the signal."""
    out = tmp_path / "run.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SWEEP, _RUN, str(out)],
        cwd=ROOT,
        env=user_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not out.with_suffix(".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the sweep process only, not its group
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a run left behind by a broken run_job
    assert proc.returncode == 0 and stdout.split() == ["0", str(int(signal.SIGTERM))], (proc.returncode, stdout)
    assert out.read_text() == "saved"


def test_sweep_bad_file(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["/nonexistent/sweep.py"])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err


def test_demo_writes_figure_and_tables(tmp_path):
    """The main job end to end at a tiny budget: the demo's own config and code path, with two
    shallow nets instead of its four (the four at 20 and 56 layers are compiles of 100 s on a
    2-core CPU; the brief keeps full-size models out of the tests): the runs, the figure,
    results.md and results.json."""
    env = user_env()
    models = ["cifar_plain8", "cifar_resnet8"]
    cmd = [
        sys.executable,
        "-m",
        "resnet_jax.demo",
        f"--workdir={tmp_path}",
        "--num_steps=2",
        f"--models={','.join(models)}",
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == models
    for r in results.values():
        assert set(r) == {"steps", "train_top1_err", "test_top1_err"} and r["steps"] == 2
        assert 0 <= r["train_top1_err"] <= 1 and 0 <= r["test_top1_err"] <= 1
    assert (tmp_path / "degradation.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| model | steps | train error (%) | test error (%) |"
    assert [r.split(" | ")[:2] for r in table[2:]] == [["| cifar_plain8", "2"], ["| cifar_resnet8", "2"]]
    for name in models:
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["model"]["name"] == name and cfg["dataset"]["name"] == "digits" and cfg["num_steps"] == 2


def test_demo_training_error_is_the_last_epochs_mean(tmp_path):
    """The demo's training error is 1 - the mean train/top1_acc of the rows of the last epoch
    (paper 1's Fig. 6 plots a smoothed training error), not the last row's; its test error is
    the last eval's, with that eval's step."""
    from resnet_jax import demo

    rows = [{"step": s, "train/top1_acc": a} for s, a in zip(range(1, 7), (0.1, 0.2, 0.3, 0.4, 0.5, 0.9))]
    rows += [{"step": 3, "eval/top1_acc": 0.25}, {"step": 6, "eval/top1_acc": 0.75}]
    write_metrics(tmp_path, rows)
    got = demo.summarize(tmp_path, steps_per_epoch=3)
    assert got == {"steps": 6, "train_top1_err": pytest.approx(0.4), "test_top1_err": pytest.approx(0.25)}
    # A step trained after the last eval (a run stopped early): the steps are still the eval's.
    rows.append({"step": 7, "train/top1_acc": 0.4})
    write_metrics(tmp_path, rows)
    got = demo.summarize(tmp_path, steps_per_epoch=3)  # steps 5, 6 and 7: (0.5 + 0.9 + 0.4) / 3
    assert got == {"steps": 6, "train_top1_err": pytest.approx(0.4), "test_top1_err": pytest.approx(0.25)}


def test_run_demo_averages_each_run_over_its_own_epoch(tmp_path, monkeypatch):
    """run_demo hands summarize the config's steps per epoch (12 for digits at batch 128), not a
    row or the whole run: a stand-in trainer logs 60 steps, right on the 11 before the last."""
    from resnet_jax import demo, train
    from resnet_jax.data import get_info
    from resnet_jax.schedules import Durations

    def fake_train(config, workdir):
        wd = pathlib.Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        n = config.num_steps
        rows = [{"step": s, "train/top1_acc": 1.0 if n - 12 < s < n else 0.0} for s in range(1, n + 1)]
        rows.append({"step": n, "eval/top1_acc": 0.5})
        write_metrics(wd, rows)

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(demo, "plot", lambda out, runs: None)
    config = demo.demo_config("cifar_resnet8", 60)
    assert Durations.from_config(config, get_info(config.dataset).num_train).steps_per_epoch == 12
    results = demo.run_demo(str(tmp_path), num_steps=60, models=["cifar_resnet8"])
    assert results["cifar_resnet8"]["train_top1_err"] == pytest.approx(1 / 12)  # 11 of 12 right


def test_demo_refuses_a_longer_run_in_its_workdir(tmp_path):
    """A workdir holding a longer demo (here a fabricated checkpoint step 8, as --num_steps=8 leaves)
    is refused at --num_steps=4 with a one-line error, before anything is trained (before: the
    trainer only warned "resuming step 8 ... num_steps 8 -> 4" and the demo printed the 8-step
    table as the 4-step one). A run at or below the steps asked for is resumed as before."""
    from resnet_jax import demo

    (tmp_path / "cifar_resnet8" / "checkpoints" / "8" / "default").mkdir(parents=True)
    assert demo.latest_step(tmp_path / "cifar_resnet8") == 8 and demo.latest_step(tmp_path / "cifar_plain8") is None
    needle = f"{tmp_path / 'cifar_resnet8'} holds a run trained to step 8, past the 4 steps asked for (--num_steps=4)"
    with pytest.raises(UserError, match=re.escape(needle) + ".*use another --workdir"):
        demo.run_demo(str(tmp_path), num_steps=4, models=["cifar_plain8", "cifar_resnet8"])
    assert not (tmp_path / "cifar_plain8").exists()  # checked before the first run is trained
    demo.check_not_past(tmp_path / "cifar_resnet8", 8, 8)  # the same length: resumed (nothing to train)
    demo.check_not_past(tmp_path / "cifar_resnet8", 16, 16)  # longer: resumed and trained on

    p = subprocess.run(
        [sys.executable, "-m", "resnet_jax.demo", f"--workdir={tmp_path}", "--num_steps=4", "--models=cifar_resnet8"],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr[-3000:])
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_demo_defaults_and_bad_models():
    """The demo trains the README's four networks by default; a bad --models is refused before
    anything is trained."""
    from resnet_jax import demo

    assert demo.MODELS == ("cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56")
    assert flags.FLAGS["models"].default == list(demo.MODELS)
    assert demo.demo_config("cifar_plain56").model.name == "cifar_plain56"
    for models, needle in [
        ([], "--models is empty"),
        (["cifar_resnet21"], "6n+2"),
        (["resnet18"], "not a CIFAR plain or residual net"),
        (["cifar_preact_resnet11"], "not a CIFAR plain or residual net"),
        (["cifar_plain8", "cifar_plain8"], "twice"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            demo.run_demo("/nonexistent/demo", models=models)


def test_experiment_config_builds_what_the_command_line_builds():
    """cli.experiment_config: a file, its ':argument' and overrides, checked as train checks them."""
    from resnet_jax.cli import experiment_config
    from resnet_jax.errors import UserError

    c = experiment_config("experiments/cifar10.py:resnet56", "--config.model.shortcut=B", "--config.batch_size=64")
    assert (c.model.name, c.model.shortcut, c.batch_size) == ("cifar_resnet56", "B", 64)
    assert c.to_dict() == {**load("cifar10.py:resnet56").to_dict(), "batch_size": 64, "model": c.model.to_dict()}
    with pytest.raises(UserError, match="unknown config key 'nope'"):
        experiment_config("experiments/digits.py", "--config.nope=1")
    with pytest.raises(UserError, match="config.trainable='x'; use one of 'all', 'head'"):
        experiment_config("experiments/digits.py", "--config.trainable=x")


@pytest.mark.parametrize(
    "override, refused",
    [
        ("batch_size=1", None),
        ("keep_checkpoints=1", None),
        (f"seed={2**31 - 1}", None),
        (f"seed={2**31}", r"config.seed=2147483648; use an integer in \[0, 2\*\*31\)"),
        ("trainable=head", None),
        ("model.bn_group_size=32", None),  # digits trains at batch 128
        ("model.bn_group_size=256", "bn_group_size=256 does not divide config.batch_size=128"),
    ],
)
def test_run_config_checks_take_the_edges_of_each_range(override, refused):
    """The checks refuse what no run can use and nothing else: the smallest batch and retention,
    the largest seed, a linear probe and a BN group that divides the batch are runs."""
    from resnet_jax.cli import experiment_config
    from resnet_jax.errors import UserError

    if refused is None:
        key, value = override.split("=")
        c = experiment_config("experiments/digits.py", f"--config.{override}")
        node = c
        for part in key.split("."):
            node = node[part]
        assert str(node) == value
    else:
        with pytest.raises(UserError, match=refused):
            experiment_config("experiments/digits.py", f"--config.{override}")


def test_model_options_compute_in_bf16_only_with_half_precision():
    c = load("digits.py")
    c.half_precision = True
    assert model_options(c)["dtype"] == "bfloat16"
    c.half_precision = False
    assert model_options(c)["dtype"] == "float32"
