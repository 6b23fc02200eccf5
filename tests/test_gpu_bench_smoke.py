"""benchmarks/gpu_bench.py and gpu_check.sh are not broken: the CPU smoke mode (tiny shapes, tiny random models)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from layerskip_ext import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_cpu_small(tmp_path):
    out = tmp_path / "gpu_bench.json"
    # the child imports the same layerskip_ext as this process (the installed one in CI, whose native extension is
    # built; the source tree's python/ has no compiled module after a non-editable install)
    import layerskip_ext
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(layerskip_ext.__file__))] +
        ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--device", "cpu", "--small", "--threads",
         "1", "--new-tokens", "5", "--num-prompts", "1", "--budget-s", "60", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == [], data["errors"]
    assert data["bandwidth"]["GBps"] > 0
    if ops.native_available():
        measured = {r["op"] for r in data["ops"] if "us" in r}
        assert measured == {"rms_norm", "rope", "kv_cache_write", "cache_attention", "linear", "exit_head_argmax",
                            "exit_head_sample", "verify_greedy", "verify_sampling", "layer_range_forward"}
        prompt = [r for r in data["ops"] if r["op"] == "layer_range_forward" and "prompt" in r["shape"]]
        assert len(prompt) == 1 and prompt[0]["TFLOPs"] > 0
    models = data["e2e"]
    assert len(models) == 2
    for m in models:
        strategies = [r["strategy"].split()[0] for r in m["rows"]]
        assert strategies[:2] == ["autoregressive", "early_exit"] and "self_speculative" in strategies
        assert all(r["tokens_per_s"] > 0 for r in m["rows"])
    assert data["lossless_greedy"]["all_equal"] is True and len(data["lossless_greedy"]["checks"]) == 4
    assert "lossless" in proc.stdout and "copy bandwidth" in proc.stdout


def test_gpu_check_script_parses():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout
