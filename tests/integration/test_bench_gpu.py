"""The GPU benchmark script still runs: `benchmarks/gpu.sh --quick` on the CPU (tiny sizes, private
Ray), and the full mode refuses to start without a CUDA device.

Mostly process start-up (Ray, its tokenizer actor, DeepSpeed): about 50 s on an idle 2-core
machine, hence ``slow`` (still part of the default suite).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks.bench_gpu import MEASUREMENTS
from tests.conftest import REPO

GPU_SH = str(REPO / "benchmarks" / "gpu.sh")
CPU_ONLY = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def table_values(stdout: str) -> dict[str, float]:
    """measurement -> value of the printed Markdown table (``| measurement | setting | value | unit |``)."""
    lines = stdout.splitlines()
    start = lines.index("| measurement | setting | value | unit |") + 2
    values = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        values[cells[0]] = float(cells[-2].replace(",", ""))
    return values


def test_full_mode_refuses_without_a_cuda_device():
    result = subprocess.run([GPU_SH], cwd=REPO, env=CPU_ONLY, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr


@pytest.mark.slow
def test_quick_mode_prints_every_measurement_with_a_positive_value(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([GPU_SH, "--quick", "--out", str(out)], cwd=REPO, env=CPU_ONLY, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"^device: CPU .*; torch: .*; cuda: ", result.stdout, flags=re.MULTILINE), result.stdout
    values = table_values(result.stdout)
    assert list(values) == list(MEASUREMENTS), result.stdout
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values
    saved = json.loads(out.read_text())
    assert [r["measurement"] for r in saved["rows"]] == list(MEASUREMENTS)
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in saved["rows"]), saved["rows"]
