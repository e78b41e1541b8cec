"""The benchmark scripts still run: `benchmarks/run_all.sh --quick` (tiny inputs, private Ray).

Mostly process start-up (Ray, Ray Train, DeepSpeed, open_clip imports in every worker): 2 minutes
on an idle 2-core machine, 5 at load average 6, hence ``slow`` (still part of the default suite).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

RATIOS = re.compile(r"^ratios:( [\w/]+=[-+.\deE]+)+$")
TITLES = ("Pre-tokenize throughput", "Token shard size", "Tokenizer training step", "Scaling sketch",
          "Next-scale sampling")


@pytest.mark.slow
def test_every_benchmark_prints_a_table_and_ends_with_a_ratio_line():
    result = subprocess.run([str(REPO / "benchmarks" / "run_all.sh"), "--quick"], cwd=REPO,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=850)
    assert result.returncode == 0, result.stderr[-4000:]
    sections = re.split(r"^# ", result.stdout, flags=re.MULTILINE)[1:]
    assert len(sections) == len(TITLES), result.stdout
    for section, title in zip(sections, TITLES):
        lines = [line for line in section.splitlines() if line.strip()]
        assert lines[0].startswith(title), lines[0]
        assert any(line.startswith("|---") for line in lines), section
        assert RATIOS.match(lines[-1]), lines[-1]
