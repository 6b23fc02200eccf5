"""benchmarks/gpu_static.py runs without a GPU (nvcc + cuobjdump + the emulated launchers' dry run) and its report
holds: no kernel spills, every kernel has __launch_bounds__ (its block size), and the last line is the summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_static_report(tmp_path):
    out = tmp_path / "static.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_static.py"), "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    if res.returncode == 2 and os.environ.get("LAYERSKIP_EXPECT_CUDA") != "1":
        pytest.skip(f"no CUDA toolkit here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert re.fullmatch(r"estimated fraction of HBM bandwidth, worst decode kernel: \d\.\d\d", lines[-1]), lines[-1]
    data = json.loads(out.read_text())
    kernels = data["kernels"]
    assert kernels, "no kernels found"
    spills = {n: (k["spill_stores"], k["spill_loads"]) for n, k in kernels.items() if k["spill_stores"] or k["spill_loads"]}
    assert not spills, f"kernels that spill: {spills}"
    assert all(r.get("error") is None for r in data["ops"]), [r for r in data["ops"] if r.get("error")]
