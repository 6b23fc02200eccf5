"""Do the emulated-CUDA tests bite? Each mutation below breaks csrc/cuda/kernels.cu in one small way (or undoes one
of the fixes the emulated tests found); for each, a copy of csrc/ is mutated, the emulated kernels are rebuilt
from it and tests/test_cuda_emulated.py runs until its first failure. A mutation no test notices is a hole.

    python tests/kernel_mutations.py [--only NAME ...] [--markdown FILE]

The working tree is never touched (LAYERSKIP_EMU_CSRC points the build at the copy).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "cuda/kernels.cu"

# name: (file under csrc/, exact text, replacement, what it breaks)
MUTATIONS = {
    "rms_norm: no barrier after the warp partials": (
        KERNELS, "if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;\n  __syncthreads();",
        "if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;", "a removed __syncthreads"),
    "row_max: no barrier before the block maximum is read": (
        KERNELS, "    s_red[0] = r;\n  }\n  __syncthreads();\n  const float r = s_red[0];",
        "    s_red[0] = r;\n  }\n  const float r = s_red[0];", "a removed __syncthreads"),
    "load_vec: tail reads one element past K": (
        KERNELS, "for (int i = 0; i < kN; ++i) v[i] = k + i < K ? to_f32(p[k + i]) : 0.0f;",
        "for (int i = 0; i < kN; ++i) v[i] = k + i <= K ? to_f32(p[k + i]) : 0.0f;", "an off-by-one in a tail loop"),
    "cache_attention: last key skipped": (
        KERNELS, "for (int64_t s = warp; s <= pos; s += kAttnWarps)", "for (int64_t s = warp; s < pos; s += kAttnWarps)",
        "an off-by-one in a loop bound"),
    "kv_cache_write: cache rows strided by T instead of S": (
        KERNELS, "const int64_t dst = ((b * nKV + h) * S + slot) * D + d;",
        "const int64_t dst = ((b * nKV + h) * T_ + slot) * D + d;", "a wrong stride"),
    "rope: rows strided by half the head dim": (
        KERNELS, "    const T* xr = x + row * 2 * half;", "    const T* xr = x + row * half;", "a wrong stride"),
    "warp_dot_rows: row mask dropped": (
        KERNELS, "      if (m < rows) {\n        float xv[kN];", "      {\n        float xv[kN];", "a dropped mask"),
    "cache_attention: head-dim mask dropped in q": (
        KERNELS, "qv[i] = d < D ? to_f32(qrow[d]) : 0.0f;", "qv[i] = to_f32(qrow[d]);", "a dropped mask"),
    "argmax: ties go to the later column": (
        KERNELS, "return best_idx < 0 || (!isnan(best) && (isnan(v) || v > best));",
        "return best_idx < 0 || (!isnan(best) && (isnan(v) || v >= best));", "a swapped tie-break"),
    "warp_sum: last butterfly step missing": (
        KERNELS, "for (int off = 16; off >= 1; off /= 2)", "for (int off = 16; off > 1; off /= 2)",
        "a shuffle reduction cut short"),
    "verify_sampling: accepts on equality": (
        KERNELS, "if (!(__fmul_rn(ub[j], qy) < py)) break;", "if (!(__fmul_rn(ub[j], qy) <= py)) break;",
        "a comparison off by one"),
    "undo fix: -inf score in the online softmax": (
        KERNELS, "const float corr = m == m_new ? 1.0f : expf(m - m_new);\n    const float p = sc == -INFINITY ? 0.0f : expf(sc - m_new);",
        "const float corr = expf(m - m_new);\n    const float p = expf(sc - m_new);", "fixed bug: -inf -> NaN"),
    "undo fix: float16 linear read as float32": (
        KERNELS, "  dispatch(dt, [&](auto tag) {\n    using Ty = decltype(tag);\n    launch(linear_kernel<Ty>,",
        "  dispatch(dt == DType::kFloat16 ? DType::kFloat32 : dt, [&](auto tag) {\n    using Ty = decltype(tag);\n"
        "    launch(linear_kernel<Ty>,", "fixed bug: dispatch_lin"),
    "undo fix: verify_greedy not a grid-stride loop": (
        KERNELS, "for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += int64_t(gridDim.x) * blockDim.x) {",
        "for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b = B) {", "fixed bug: grid_1d cap"),
    "undo fix: a bad vocab_subset entry reads row 0": (
        KERNELS, "  if (row >= 0 && row < rows_w) {\n    warp_dot_rows(x, K, rows, w + row * K, K, vec_ok, acc);\n    return true;\n  }",
        "  if (row >= 0 && row < rows_w) {\n    warp_dot_rows(x, K, rows, w + row * K, K, vec_ok, acc);\n    return true;\n  }\n"
        "  warp_dot_rows(x, K, rows, w, K, vec_ok, acc);", "fixed bug: empty lm_head"),
    "undo fix: bad uniforms not flagged": (
        KERNELS, "if (!(u >= 0.0f && u < 1.0f)) atomicOr(errors, kDeviceErrorUniform);", "",
        "fixed bug: silent device-side bad ids"),
}


def run(name: str, spec, cache: Path, timeout: int) -> dict:
    rel, old, new, kind = spec
    with tempfile.TemporaryDirectory() as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(ROOT / "csrc", csrc)
        path = csrc / rel
        text = path.read_text()
        n = text.count(old)
        if n != 1:
            return dict(name=name, kind=kind, result=f"NOT APPLIED (text found {n} times)", test="", seconds=0.0)
        path.write_text(text.replace(old, new))
        env = dict(os.environ, LAYERSKIP_EMU_CSRC=str(csrc), LAYERSKIP_EMU_CACHE=str(cache))
        t0 = time.time()
        try:
            res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                  str(ROOT / "tests" / "test_cuda_emulated.py")], cwd=ROOT / "tests", env=env,
                                 capture_output=True, text=True, timeout=timeout)
            out, rc = res.stdout + res.stderr, res.returncode
        except subprocess.TimeoutExpired:
            out, rc = "", -1
        dt = time.time() - t0
    failed = re.search(r"^FAILED (\S+)", out, re.M)
    if rc == 0:
        result, test = "SURVIVED (no test failed)", ""
    elif rc == -1:
        result, test = f"timed out after {timeout} s", ""
    elif failed:
        result, test = "caught", failed.group(1).split("::", 1)[-1]
    else:
        result, test = f"caught (pytest exit {rc}: crash)", out.strip().splitlines()[-1][:120] if out.strip() else ""
    return dict(name=name, kind=kind, result=result, test=test, seconds=dt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="substrings of mutation names to run")
    ap.add_argument("--markdown", type=Path, help="write the table here too")
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args()
    chosen = {k: v for k, v in MUTATIONS.items() if not args.only or any(o in k for o in args.only)}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name, spec in chosen.items():
            r = run(name, spec, Path(cache), args.timeout)
            rows.append(r)
            print(f"{r['result']:<28} {r['seconds']:6.1f} s  {name}  [{r['test']}]", flush=True)
    table = ["| mutation of csrc/cuda/kernels.cu | kind | result | first failing test | s |", "|---|---|---|---|---:|"]
    table += [f"| {r['name']} | {r['kind']} | {r['result']} | `{r['test']}` | {r['seconds']:.0f} |" for r in rows]
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    return 0 if all(r["result"].startswith("caught") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
