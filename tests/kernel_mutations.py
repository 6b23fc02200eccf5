"""Do the emulated-CUDA tests bite? Each mutation below breaks csrc/cuda/kernels.cu in one small way (or undoes one
of the fixes the emulated tests found); for each, a copy of csrc/ is mutated, the emulated kernels are rebuilt
from it and tests/test_cuda_emulated.py runs until its first failure. A mutation no test notices is a hole.

    python tests/kernel_mutations.py [--only NAME ...] [--markdown FILE]

The working tree is never touched (LAYERSKIP_EMU_CSRC points the build at the copy). Both emulated test files run
(test_cuda_emulated.py, test_cuda_emulated_decoder.py), each until its first failure.
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
TEST_FILES = ("test_cuda_emulated.py", "test_cuda_emulated_decoder.py")

# name: (file under csrc/, exact text, replacement, what it breaks)
GEMV, ATTN, HEADS, DEVICE = "cuda/gemv.cu", "cuda/attention.cu", "cuda/heads.cu", "cuda/device.cuh"
MUTATIONS = {
    "rms_norm: no barrier after the warp partials": (
        KERNELS, "if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;\n  __syncthreads();",
        "if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;", "a removed __syncthreads"),
    "row_max: no barrier before the block maximum is read": (
        HEADS, "    s_red[0] = r;\n  }\n  __syncthreads();\n  const float r = s_red[0];",
        "    s_red[0] = r;\n  }\n  const float r = s_red[0];", "a removed __syncthreads"),
    "load_raw: tail reads one element past K": (
        DEVICE, "e[i] = (p != nullptr && k + i < K) ? p[k + i] : from_f32<T>(0.0f);",
        "e[i] = (p != nullptr && k + i <= K) ? p[k + i] : from_f32<T>(0.0f);", "an off-by-one in a tail loop"),
    "cache_attention: a row's last key skipped": (
        ATTN, "const bool seen = lane < KT && lane <= lim;", "const bool seen = lane < KT && lane < lim;",
        "an off-by-one in a loop bound"),
    "kv_cache_write: cache rows strided by T instead of S": (
        KERNELS, "const int64_t dst = ((b * nKV + h) * S + slot) * D + d;",
        "const int64_t dst = ((b * nKV + h) * T_ + slot) * D + d;", "a wrong stride"),
    "rope: rows strided by half the head dim": (
        KERNELS, "    const T* xr = x + row * 2 * half;", "    const T* xr = x + row * half;", "a wrong stride"),
    "gemv: row mask dropped": (
        GEMV, "  for (int m = 0; m < ROWS; ++m) {\n    if (m < rows) {\n      float xf[kN];",
        "  for (int m = 0; m < ROWS; ++m) {\n    {\n      float xf[kN];", "a dropped mask"),
    "cache_attention: head-dim mask dropped in q": (
        ATTN, "if (r < rows && d < D) {", "if (r < rows) {", "a dropped mask"),
    "argmax: ties go to the later column": (
        GEMV, "return best_idx < 0 || (!isnan(best) && (isnan(v) || v > best));",
        "return best_idx < 0 || (!isnan(best) && (isnan(v) || v >= best));", "a swapped tie-break"),
    "warp_sum: last butterfly step missing": (
        DEVICE, "for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync", "for (int off = 16; off > 1; off /= 2) v += "
        "__shfl_xor_sync", "a shuffle reduction cut short"),
    "verify_sampling: accepts on equality": (
        KERNELS, "if (!(__fmul_rn(ub[j], qy) < py)) break;", "if (!(__fmul_rn(ub[j], qy) <= py)) break;",
        "a comparison off by one"),
    "undo fix: -inf score in the online softmax": (
        ATTN, "const float corr = m_old == m_new ? 1.0f : expf(m_old - m_new);\n      const float pv = (!seen || sc == -INFINITY) ? 0.0f : expf(sc - m_new);",
        "const float corr = expf(m_old - m_new);\n      const float pv = !seen ? 0.0f : expf(sc - m_new);", "fixed bug: -inf -> NaN"),
    "undo fix: float16 linear read as float32": (
        GEMV, "  dispatch(dt, [&](auto tag) {\n    using Ty = decltype(tag);\n    launch_gemv<Ty, kGemvDense>",
        "  dispatch(dt == DType::kFloat16 ? DType::kFloat32 : dt, [&](auto tag) {\n    using Ty = decltype(tag);\n"
        "    launch_gemv<Ty, kGemvDense>", "fixed bug: dispatch_lin"),
    "undo fix: verify_greedy not a grid-stride loop": (
        KERNELS, "for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += int64_t(gridDim.x) * blockDim.x) {",
        "for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b = B) {", "fixed bug: grid_1d cap"),
    "undo fix: a bad vocab_subset entry reads row 0": (
        GEMV, "wrow[c] = valid[c] ? p.w[0] + r * K : nullptr;", "wrow[c] = p.w[0] + (valid[c] ? r : 0) * K;",
        "fixed bug: empty lm_head"),
    "undo fix: bad uniforms not flagged": (
        HEADS, "if (!(u >= 0.0f && u < 1.0f)) atomicOr(errors, kDeviceErrorUniform);", "",
        "fixed bug: silent device-side bad ids"),
    # issue 13's kernels
    "gemv: the block's partials added in another tree": (
        GEMV, "      for (int q = 0; q < rows * C; ++q) s_red[q][t] += s_red[q][t + stride];",
        "      for (int q = 0; q < rows * C; ++q) s_red[q][t] += s_red[q][kGemvThreads / 2 - 1 - t + stride];",
        "a wrong split-K combine order"),
    "gemv: no barrier between the tree's levels": (
        GEMV, "      for (int q = 0; q < rows * C; ++q) s_red[q][t] += s_red[q][t + stride];\n    __syncthreads();",
        "      for (int q = 0; q < rows * C; ++q) s_red[q][t] += s_red[q][t + stride];", "a removed __syncthreads"),
    "gemv: the tail's first chunk given to the wrong warp": (
        GEMV, "for (int64_t j = full + ((warp - full) % kGemvWarps + kGemvWarps) % kGemvWarps; j < nchunks;",
        "for (int64_t j = full + warp; j < nchunks;", "a wrong split-K assignment"),
    "linear_multi: columns of the later matrices not offset": (
        GEMV, "      wrow[c] = p.w[i] + (nn - p.n_begin[i]) * K;", "      wrow[c] = p.w[i] + nn * K;", "a wrong offset"),
    "gemv: residual added before rounding the product": (
        GEMV, "*o = from_f32<T>(to_f32(*o) + round_to<T>(s));", "*o = from_f32<T>(to_f32(*o) + s);",
        "a rounding step dropped"),
    "attention: keys past a row's position accumulated into v": (
        ATTN, "const int n = static_cast<int>(lim + 1 < KT ? lim + 1 : KT);", "const int n = KT;",
        "a dropped chunk mask"),
    "attention combine: a chunk past the row's position merged": (
        ATTN, "const int64_t nc = pos / LC + 1;", "const int64_t nc = pos / LC + 2;", "a dropped chunk mask"),
    "decoder attention: new keys written without RoPE": (
        ATTN, "        rope_pair(p.k_new[src + i], p.k_new[src + i + half], p.cos[pos * half + i], p.sin[pos * half + i], kd[i],\n"
        "                  kd[i + half]);", "        kd[i] = p.k_new[src + i];\n        kd[i + half] = p.k_new[src + i + half];",
        "a fused step dropped"),
    "decoder attention: no barrier between the cache writes and the tile loads": (
        ATTN, "    __syncthreads();  // the block's own cache writes are visible to its loads below", "",
        "a removed __syncthreads"),
    "argmax final: ties go to the later partial": (
        HEADS, "return v > bv || (v == bv && i < bi);", "return v > bv || (v == bv && i > bi);", "a swapped tie-break"),
    "sampling: the high words of the split weight sums dropped": (
        HEADS, "  if (wh != 0) atomicAdd(hi, wh);", "", "a dropped carry"),
    "multi-block sampling: the ties of the blocks before not counted": (
        HEADS, "    for (int64_t b = 0; b < blockIdx.x; ++b) before += r.ties[b];\n", "",
        "a dropped cross-block offset"),
    "multi-block sampling: the max of the first block only": (
        HEADS, "for (int64_t b = 0; b < P; ++b) mx = r.block_max[b] > mx ? r.block_max[b] : mx;",
        "for (int64_t b = 0; b < 1; ++b) mx = r.block_max[b] > mx ? r.block_max[b] : mx;",
        "a reduction over part of the blocks"),
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
                                  *(str(ROOT / "tests" / f) for f in TEST_FILES)], cwd=ROOT / "tests", env=env,
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
    table = ["| mutation of csrc/cuda | kind | result | first failing test | s |", "|---|---|---|---|---:|"]
    table += [f"| {r['name']} | {r['kind']} | {r['result']} | `{r['test']}` | {r['seconds']:.0f} |" for r in rows]
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    return 0 if all(r["result"].startswith("caught") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
