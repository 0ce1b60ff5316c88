"""The benchmark scripts stay runnable: the kernel benchmark's smoke mode checks every kernel path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_kernel_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "kernels-smoke.json").read_text())
    assert {r["format"] for r in report["rows"]} == {"int4-g128", "int8"}
    assert len(report["rows"]) == 2 * 2 * 3 and all(r["rel_err"] < 1e-2 for r in report["rows"])
