"""Every experiment config loads, documents itself, and builds a valid model; sweeps run and resume."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags
from cli_env import user_env
from ml_collections import config_flags

from resnet_jax import sweep
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
    *[f"cifar_preact.py:{d}:cifar10:original" for d in (164, 1001)],
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


def test_bad_config_argument():
    """The config's own ValueError (not just the repeated path) reaches the flag's error."""
    msg = "experiments/cifar10.py:resnet21: use resnet{20,32,44,56,110,1202} or plain{20,32,44,56,110}"
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


def test_sweep_writes_slurm_array(tmp_path, capsys):
    """The script's directory is created; its commands run from here with this Python (the
    relative config and workdir paths resolve wherever it is submitted from)."""
    path = write_sweep(tmp_path)
    out = tmp_path / "new" / "sweep.sbatch"
    assert sweep.main([str(path), "--seeds", "3", "--root", str(tmp_path / "r"), "--slurm", str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --array=0-2" in text and text.count("resnet_jax.train") == 3 and "--config.seed=2" in text
    assert f"cd {os.getcwd()}\n" in text and text.count(sys.executable) == 3
    assert f"#SBATCH --output={(tmp_path / 'r' / 'slurm_logs').absolute()}/" in text
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # never overwrite: a usage error (2), the file as it was
        sweep.main([str(path), "--seeds", "1", "--root", str(tmp_path / "r"), "--slurm", str(out)])
    assert e.value.code == 2 and "exists; choose another --slurm path" in capsys.readouterr().err
    assert out.read_text() == text


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
        assert set(r) == {"train_top1_err", "test_top1_err"} and all(0 <= v <= 1 for v in r.values())
    assert (tmp_path / "degradation.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| model | train error (%) | test error (%) |" and [r.split(" | ")[0] for r in table[2:]] == [
        "| cifar_plain8",
        "| cifar_resnet8",
    ]
    for name in models:
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["model"]["name"] == name and cfg["dataset"]["name"] == "digits" and cfg["num_steps"] == 2


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
