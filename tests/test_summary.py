"""The summary CLI: its table and totals, its one-line errors, and that it never imports TensorFlow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from resnet_jax.summary import format_count, format_table, main, summarize

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_resnet50_totals():
    result = _run("-m", "resnet_jax.summary", "resnet50")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for stage in ("stem", "stage1", "stage2", "stage3", "stage4", "head"):
        assert re.search(rf"^{stage}\s", out, re.MULTILINE), out
    total = re.search(r"^total:\s+([\d,]+) parameters, ([\d.]+) GMACs", out, re.MULTILINE)
    assert total, out
    assert total.group(1) == "25,557,032"
    assert abs(float(total.group(2)) - 4.09) <= 0.02 * 4.09  # torchvision: 4.09 GFLOPS (MACs)
    assert re.search(r"^total\s.*25,557,032\s+4\.09 G$", out, re.MULTILINE), out  # the table's last row


def test_cli_bad_name_is_one_line_error():
    result = _run("-m", "resnet_jax.summary", "resnet51")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "resnet" in lines[0], result.stderr


def test_bad_options_in_process(capsys):
    # The same error path in-process (no interpreter start-up), for option errors and argparse's.
    for argv in (
        ["resnet18", "--stride_in", "1x1"],
        ["resnet50", "--shortcut", "Z"],
        ["resnet50", "--scan_blocks", "maybe"],
        ["resnet50", "--image_size", "0"],
    ):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors exit through parser.exit
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (argv, err)


def test_import_does_not_load_tensorflow():
    code = "import sys, resnet_jax.summary; assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr


def test_format_helpers():
    assert format_count(4_089_184_256) == "4.09 G"
    assert format_count(512_000) == "512.00 K"
    assert format_count(640) == "640"
    table = format_table(summarize("cifar_resnet20"))
    assert table.splitlines()[0].split() == ["part", "blocks", "output", "params", "MACs"]
    assert table.splitlines()[-1].split() == ["total", "9", "10", "269,722", "40.55", "M"]
