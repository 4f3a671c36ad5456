"""torchvision -> resnet_jax weight import: logit parity in eval and train mode, errors, and the CLI.

The parity tests need torch and torchvision (optional dependencies) and are skipped without them;
the CLI's refusals are checked without torch. No weights are downloaded: torchvision models are
built with random weights, and BatchNorm's affine parameters and running statistics are randomised
too, so that a mix-up of scale/bias/mean/var cannot go unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax.convert import load_converted, load_torchvision, read_pth
from resnet_jax.convert import main as convert_main
from resnet_jax.errors import UserError
from resnet_jax.models import create_model
from resnet_jax.summary import abstract_model

REPO = Path(__file__).resolve().parents[1]
IMAGENET_RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
TRAIN_TOLERANCE = {"resnet101": 5e-3, "resnet152": 5e-3}  # see test_logits_match_torchvision


@pytest.fixture(scope="module")
def torch():
    # torch and torchvision are optional for users but always installed for the tests (make test
    # installs the [torch] extra): a missing one is an error here, not a skipped parity test.
    import torch
    import torchvision  # noqa: F401

    torch.set_num_threads(2)
    return torch


def _torchvision(name: str, torch, *, seed: int, num_classes: int = 1000):
    """A torchvision ResNet with random weights and random BatchNorm parameters and statistics."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _images(seed: int = 0, batch: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _nchw(torch, x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference relative to the reference's largest logit."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _forward(model, x: np.ndarray) -> np.ndarray:
    # "highest": on GPUs XLA may otherwise use TF32 for float32 convolutions.
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(x)))


@pytest.mark.parametrize("name", IMAGENET_RESNETS)
def test_logits_match_torchvision(torch, name):
    tv = _torchvision(name, torch, seed=0)
    # Loaded into an abstract model: this also proves every variable is filled by the import.
    model = load_torchvision(abstract_model(name, num_classes=1000), tv.state_dict())
    x = _images()
    xt = _nchw(torch, x)

    tv.eval()
    model.eval()
    with torch.no_grad():
        ref = tv(xt).numpy()
    ours = _forward(model, x)
    assert ours.shape == ref.shape == (2, 1000)
    assert _rel_err(ours, ref) < 1e-4

    # Train mode: batch statistics (biased variance, as torch normalises with) and running-stat updates.
    old_mean, old_var = tv.bn1.running_mean.numpy().copy(), tv.bn1.running_var.numpy().copy()
    tv.train()
    model.train()
    with torch.no_grad():
        ref = tv(xt).numpy()
    ours = _forward(model, x)
    # A deep random net in train mode at batch 2 is ill-conditioned (each BN renormalises over few
    # samples and perturbations grow through the blocks): torch's own float32 logits differ from
    # its float64 ones by 3e-4 (ResNet-101) and 1.7e-3 (ResNet-152) here, and ours from torch
    # float64 by as much. Hence the looser bound for those two; a real mismatch is O(1).
    assert _rel_err(ours, ref) < TRAIN_TOLERANCE.get(name, 1e-4)

    # Running statistics: our momentum 0.9 is torch's 0.1. The mean matches; for the variance torch
    # stores the unbiased batch variance and we the biased one (n = 2 * 32 * 32 after the stem).
    n = 2 * 32 * 32
    np.testing.assert_allclose(np.asarray(model.bn1.mean[...]), tv.bn1.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    ours_batch_var = (np.asarray(model.bn1.var[...]) - 0.9 * old_var) / 0.1
    torch_batch_var = (tv.bn1.running_var.numpy() - 0.9 * old_var) / 0.1
    np.testing.assert_allclose(ours_batch_var * n / (n - 1), torch_batch_var, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(model.bn1.mean[...]), old_mean)  # it did update


def test_scanned_stages_and_numpy_state_dict(torch):
    """Scanned stages are filled by stacking torchvision's blocks 1..n-1, in order."""
    tv = _torchvision("resnet34", torch, seed=2).eval()
    state = {k: v.numpy() for k, v in tv.state_dict().items()}  # numpy values work as well
    model = load_torchvision(abstract_model("resnet34", num_classes=1000, scan_blocks=True), state)
    assert all(stage.scanned is not None for stage in model.stages)
    model.eval()
    x = _images(seed=2)
    with torch.no_grad():
        ref = tv(_nchw(torch, x)).numpy()
    assert _rel_err(_forward(model, x), ref) < 1e-4


def test_load_errors(torch):
    sd = _torchvision("resnet18", torch, seed=3).state_dict()
    fresh = lambda **o: abstract_model("resnet18", num_classes=1000, **o)  # noqa: E731

    with pytest.raises(UserError, match=r"does not use: extra\.weight"):
        load_torchvision(fresh(), {**sd, "extra.weight": sd["fc.bias"]})
    with pytest.raises(UserError, match=r"lacks 1 key.*layer4\.1\.bn2\.running_var"):
        load_torchvision(fresh(), {k: v for k, v in sd.items() if k != "layer4.1.bn2.running_var"})
    with pytest.raises(UserError, match=r"fc\.bias has shape \(1000,\).*--num_classes"):
        load_torchvision(abstract_model("resnet18", num_classes=10), sd)
    with pytest.raises(UserError, match="this model has 'C'"):  # option C projects on every block
        load_torchvision(fresh(shortcut="C"), sd)
    with pytest.raises(UserError, match="no torchvision counterpart"):
        load_torchvision(abstract_model("preact_resnet18", num_classes=1000), sd)
    with pytest.raises(UserError, match="stride_in='3x3'"):
        load_torchvision(abstract_model("resnet50", num_classes=1000, stride_in="1x1"), sd)
    # Shapes that fit, another function: 0.5/0.5 scaling, another BatchNorm epsilon.
    with pytest.raises(UserError, match=r"shortcut 'B'\); this model has 'scaled'"):
        load_torchvision(fresh(shortcut="scaled"), sd)
    with pytest.raises(UserError, match=r"epsilon 1e-05; this model has bn_epsilon=0.001"):
        load_torchvision(fresh(bn_epsilon=1e-3), sd)
    with pytest.raises(UserError, match="ImageNet stem"):
        load_torchvision(abstract_model("cifar_resnet20", num_classes=10), sd)
    # A DataParallel "module." prefix is stripped; num_batches_tracked is ignored (it is in sd).
    assert any(k.endswith("num_batches_tracked") for k in sd)
    load_torchvision(fresh(), {f"module.{k}": v for k, v in sd.items()})


def test_keep_head_loads_the_trunk_for_another_number_of_classes(torch):
    """keep_head=True: torchvision's trunk into a 10-class model whose fc stays as initialised;
    the pooled features are torchvision's (its fc replaced by the identity)."""
    tv = _torchvision("resnet18", torch, seed=4).eval()
    model = create_model("resnet18", num_classes=10, rngs=nnx.Rngs(0))
    fc_before = np.array(model.fc.kernel[...])
    load_torchvision(model, tv.state_dict(), keep_head=True)
    np.testing.assert_array_equal(model.fc.kernel[...], fc_before)
    model.eval()
    x = _images(seed=1)
    tv.fc = torch.nn.Identity()
    with torch.no_grad():
        ref = tv(_nchw(torch, x)).numpy()
    assert _rel_err(np.asarray(model.features(x)), ref) < 1e-4
    with pytest.raises(UserError, match="keep_head=True keeps model.fc, which is abstract here"):
        load_torchvision(abstract_model("resnet18", num_classes=10), tv.state_dict(), keep_head=True)


def _run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "resnet_jax.convert", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr


def test_cli_round_trip(torch, tmp_path):
    tv = _torchvision("resnet18", torch, seed=1, num_classes=10).eval()
    pth = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), pth)
    out = tmp_path / "converted"
    result = _run_cli("--model", "resnet18", "--pth", str(pth), "--out", str(out), "--num_classes", "10")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "model.json").read_text()) == {
        "name": "resnet18",
        "num_classes": 10,
        "options": {"shortcut": "B"},
    }

    model = load_converted(out)  # in eval mode
    x = _images(seed=1)
    with torch.no_grad():
        ref = tv(_nchw(torch, x)).numpy()
    assert _rel_err(_forward(model, x), ref) < 1e-4

    # Never overwrite: the existing, now non-empty, directory is refused and left as it was.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = _run_cli("--model", "resnet18", "--pth", str(pth), "--out", str(out), "--num_classes", "10")
    _assert_one_line_error(result, "already exists")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_cli_refuses_nonempty_out_and_missing_pth(tmp_path, capsys):
    # In-process (a real process is checked by test_cli_round_trip and test_cli_without_torch).
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"not read: the --out check comes first")

    def run(*args: str) -> tuple[int, list[str]]:
        code = convert_main(list(args))
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run("--model", "resnet18", "--pth", str(pth), "--out", str(out))
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    code, err = run("--model", "resnet18", "--pth", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "no such file" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_without_torch(tmp_path):
    """Importing the module never imports torch; without torch the CLI says so in one line."""
    code = (
        "import sys\n"
        "import resnet_jax.convert as c\n"
        "assert 'torch' not in sys.modules, 'resnet_jax.convert imported torch'\n"
        "sys.modules['torch'] = None  # makes `import torch` fail, as if it were not installed\n"
        "sys.exit(c.main(sys.argv[1:]))\n"
    )
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"x")
    result = _run_cli("--model", "resnet18", "--pth", str(pth), "--out", str(tmp_path / "o"), code=code)
    _assert_one_line_error(result, "needs torch")


def test_read_pth_unwraps_a_training_checkpoint_and_reads_the_legacy_format(torch, tmp_path):
    """A training script's ``{"model": state_dict, "epoch": ...}`` is unwrapped, and torch.save's
    pre-1.6 format (a bare pickle, first byte 0x80, not a zip) is read as a PyTorch file too."""
    sd = {"fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "fc.bias": torch.ones(2)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    got = read_pth(tmp_path / "ckpt.pth")
    assert set(got) == {"fc.weight", "fc.bias"}
    np.testing.assert_array_equal(got["fc.weight"].numpy(), sd["fc.weight"].numpy())
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80"
    np.testing.assert_array_equal(read_pth(legacy)["fc.bias"].numpy(), np.ones(2, np.float32))
