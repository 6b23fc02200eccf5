"""Static GPU performance report of the CUDA kernels: no GPU needed, every number below is an ESTIMATE.

    python benchmarks/gpu_static.py [--csrc DIR] [--arch sm_90] [--json FILE] [--quiet]

1. compiles every csrc/cuda/*.cu for sm_90 with the extension's flags and `-Xptxas -v`, and reads back the cubin
   with cuobjdump (-sass, -elf; the toolkit's, or the copy shipped in the `triton` package);
2. per kernel: registers, spills (stack frame / spill stores and loads), static shared memory, threads per block
   (its __launch_bounds__), occupancy on an sm_90 SM at that block size (65536 registers, 228 KB shared memory,
   2048 threads, 32 blocks per SM), and its hot loop in the SASS (the innermost loop with the most global-load
   bytes): 128-bit global loads (LDG.E.128) per iteration, how many loads issue before the first instruction that
   uses a loaded register (independent loads in flight), bytes in flight per warp from HBM, CAS spin loops;
3. a Little's-law estimate of the HBM bandwidth batch-1 decode of a Llama-3-8B-shaped model can reach: the real
   launch configurations come from running the launchers in the CUDA emulator's dry-run mode (tests/emulated_cuda.py:
   launches recorded, not run), so the grid of every op at every shape is the code's own. Per op, its main kernel's
   bytes in flight per SM = resident warps (occupancy, or the grid spread over the SMs if smaller) x HBM bytes in
   flight per warp, and achievable bandwidth = min(peak, SMs x bytes in flight / loaded latency).
   Which loads stream from HBM: those marked cache-streaming (__ldcs -> LDG...EF: the weight of a GEMV); in a hot
   loop without such loads, every global load (the KV tiles of attention, the old kernels' loads). Loads in flight are
   counted along the code as it runs (conditional forward branches falling through) up to the first use of a
   loaded register.
   Not modelled: the ramp up and tail of each launch, launch gaps, L2 hits, DRAM page effects, instruction issue
   limits. It is a design check (are there enough bytes in flight?), not a measurement:
   benchmarks/gpu_check.sh measures on a GPU.

The last line reads `estimated fraction of HBM bandwidth, worst decode kernel: X.XX` (the lowest estimate over the
decode ops below and the GPUs). Exit status 2 when nvcc or cuobjdump is missing (tests/test_gpu_static.py skips
then, unless LAYERSKIP_EXPECT_CUDA=1).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# sm_90 (H100 / H200) limits per SM
SM = dict(regs=65536, smem=228 * 1024, smem_reserved_per_block=1024, threads=2048, blocks=32, warps=64)
GPUS = {"H100 SXM": dict(bw=3.35e12, sms=132), "H200": dict(bw=4.8e12, sms=132)}
LATENCY_S = 700e-9  # loaded DRAM latency
# Llama-3-8B, bf16, batch 1
LLAMA3_8B = dict(H=4096, nH=32, nKV=8, D=128, I=14336, V=128256)
VERIFY_T = 4  # a verification of d = 3 drafts
CONTEXTS = (1024, 4096, 8192)
BF16 = 1  # tests/emulated_cuda.py DTYPE_CODE
ELEM = 2


class Missing(RuntimeError):
    pass


# ---- tools ---------------------------------------------------------------------------------------------------

def find_nvcc() -> Path:
    cands = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands.append(Path("/usr/local/cuda/bin/nvcc"))
    if shutil.which("nvcc"):
        cands.append(Path(shutil.which("nvcc")))
    for c in cands:
        if c.exists():
            return c
    raise Missing("nvcc not found (set CUDA_HOME)")


def find_cuobjdump(nvcc: Path) -> Path:
    cands = [nvcc.parent / "cuobjdump"]
    if shutil.which("cuobjdump"):
        cands.append(Path(shutil.which("cuobjdump")))
    try:
        import triton  # ships the toolkit's cuobjdump with its NVIDIA backend
        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in cands:
        if c.exists():
            return c
    raise Missing("cuobjdump not found (CUDA toolkit or the triton package)")


def run(cmd: list, what: str) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{' '.join(map(str, cmd))}\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr


# ---- compile and read back -----------------------------------------------------------------------------------

def nvcc_flags(arch: str, csrc: Path) -> list[str]:
    num = arch.split("_")[1]  # the extension's CUDA flags (CMakeLists.txt), one architecture
    return ["-std=c++17", "--fmad=false", "-O3", "-DNDEBUG", "-lineinfo", "-cubin",
            f"-gencode=arch=compute_{num},code={arch}", "-Xptxas", "-v", f"-I{csrc}"]


def cache_dir(nvcc: Path, csrc: Path, arch: str) -> Path:
    """Compiled cubins and ptxas logs, cached by the content of csrc/cuda + csrc/common, the flags and nvcc (a rerun,
    or gpu_check.sh after the test, does not compile again)."""
    h = hashlib.sha256(repr(nvcc_flags(arch, Path("."))).encode())
    h.update(run([nvcc, "--version"], "nvcc --version").encode())
    for folder in (csrc / "cuda", csrc / "common"):
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerskip_ext" / "gpu_static"
    return base / h.hexdigest()[:20]


def compile_one(nvcc: Path, cu: Path, csrc: Path, arch: str, out: Path) -> tuple[Path, str]:
    cubin, log_file = out / (cu.stem + ".cubin"), out / (cu.stem + ".ptxas.txt")
    if cubin.exists() and log_file.exists():
        return cubin, log_file.read_text()
    tmp = out / (cu.stem + ".tmp.cubin")
    log = run([nvcc, *nvcc_flags(arch, csrc), "-o", tmp, cu], f"nvcc {cu.name}")
    log_file.write_text(log)
    os.replace(tmp, cubin)
    return cubin, log


def parse_ptxas(log: str) -> dict:
    """mangled name -> registers, spills, stack, static shared memory (from `-Xptxas -v`)."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=0, spill_stores=0, spill_loads=0, stack=0, smem=0))
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def parse_max_threads(elf: str) -> dict:
    """mangled name -> threads per block from __launch_bounds__ (EIATTR_MAX_THREADS in .nv.info.<name>)."""
    out, cur = {}, None
    lines = elf.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\.nv\.info\.(\S+)", line.strip())
        if m:
            cur = m.group(1)
        elif cur and "EIATTR_MAX_THREADS" in line:
            for nxt in lines[i + 1:i + 4]:
                v = re.search(r"Value:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", nxt)
                if v:
                    out[cur] = int(v.group(1), 16) * int(v.group(2), 16) * int(v.group(3), 16)
                    break
    return out


def parse_sass(sass: str) -> dict:
    """mangled name -> [(address, instruction text)]."""
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return out


def load_bytes(op: str) -> int:
    """Bytes per lane of a global load opcode (0 if not a global load)."""
    if not op.startswith("LDG"):
        return 0
    for w, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if w in op:
            return b
    return 4


REG = re.compile(r"\bR(\d+)(?:\.64)?\b")


def _op(text: str) -> tuple[str, str]:
    parts = text.split(None, 2) if text.startswith("@") else [""] + text.split(None, 1)
    return parts[1], parts[2] if len(parts) > 2 else ""


def in_flight(instrs: list, start: int, index: dict) -> tuple[int, int, int]:
    """Loads issued from instruction `start` on before the first instruction that reads a loaded register, walking
    the code as it runs when every conditional forward branch falls through (branch conditions that do not read a
    load's result do not stop its data from being in flight) and unconditional ones jump; a backward branch (the end
    of a loop iteration), a barrier or an exit ends the walk. (count, bytes per lane, bytes of .EF loads)."""
    loaded: set[int] = set()
    n = nbytes = ef = 0
    i, steps = start, 0
    while i < len(instrs) and steps < 4000:
        steps += 1
        addr, t = instrs[i]
        op, operands = _op(t)
        regs = [int(r) for r in REG.findall(operands)]
        srcs = regs if op.startswith(("ST", "RED", "ATOM")) else regs[1:]
        if any(r in loaded for r in srcs) or op.startswith(("BAR", "EXIT", "RET", "WARPSYNC")):
            break
        b = load_bytes(op)
        if b:
            n, nbytes, ef = n + 1, nbytes + b, ef + (b if ".EF" in op else 0)
            loaded.update(range(regs[0], regs[0] + max(1, b // 4)) if regs else ())
        if op.startswith("BRA"):
            m = re.search(r"(0x[0-9a-f]+)\s*$", operands)
            target = int(m.group(1), 16) if m else None
            if target is None or target <= addr:
                break
            if not t.startswith("@"):
                i = index[target]
                continue
        i += 1
    return n, nbytes, ef


def hot_loop(instrs: list) -> dict:
    """What the kernel keeps in flight. The hot loop: the innermost loop (a backward branch's range) with the most
    global-load bytes; per iteration its LDG.E.128 count and load bytes per lane. Loads in flight: the most bytes
    loaded before the first use of a loaded register, walking from the kernel's start or any branch target (the
    hot loop's body, or a prefetch outside any loop: see in_flight); of those, the HBM-streaming ones (cache-streaming
    .EF loads if the walk has any, else all) give the HBM bytes in flight per warp. And the CAS
    spin loops (ATOMS.CAST.SPIN: a 64-bit shared atomic) of the kernel."""
    branches = []
    for a, text in instrs:
        m = re.search(r"\bBRA\s+(?:\S+\s+)?(0x[0-9a-f]+)", text)
        if m:
            branches.append((a, int(m.group(1), 16)))
    targets = {t for _, t in branches}
    loops = [(t, a) for a, t in branches if t <= a]
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    cas = sum("CAS" in t for _, t in instrs)
    best = None
    for lo, hi in inner:
        body = [t for a, t in instrs if lo <= a <= hi]
        lbytes = sum(load_bytes(_op(t)[0]) for t in body)
        if lbytes and (best is None or lbytes > best[0]):
            best = (lbytes, lo, hi, body)
    index = {a: i for i, (a, _) in enumerate(instrs)}
    starts = sorted({0} | {index[t] for t in targets if t in index} | {i + 1 for i, (_, t) in enumerate(instrs)
                                                                        if "BRA" in _op(t)[0] and i + 1 < len(instrs)})
    flights = [in_flight(instrs, st, index) for st in starts]
    n, nbytes, ef = max(flights, key=lambda f: (f[2] or f[1], f[1])) if flights else (0, 0, 0)
    out = dict(loop=None, ldg128=0, load_bytes=0, independent=n, hbm_bytes_per_warp=(ef or nbytes) * 32, cas=cas)
    if best is not None:
        _, lo, hi, body = best
        out.update(loop=(hex(lo), hex(hi)), load_bytes=best[0],
                   ldg128=sum(_op(t)[0].startswith("LDG") and ".128" in _op(t)[0] for t in body))
    return out


def occupancy(regs: int, smem: int, threads: int) -> dict:
    warps = max(1, math.ceil(threads / 32))
    warp_regs = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    by_regs = SM["regs"] // (warp_regs * warps)
    by_smem = SM["smem"] // (math.ceil(smem / 128) * 128 + SM["smem_reserved_per_block"])
    by_threads = SM["threads"] // (warps * 32)
    blocks = min(SM["blocks"], by_regs, by_smem, by_threads)
    limit = min(("registers", by_regs), ("shared memory", by_smem), ("threads", by_threads), ("blocks", SM["blocks"]),
                key=lambda x: x[1])[0]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, occupancy=blocks * warps / SM["warps"], limit=limit)


def demangle(names) -> dict:
    names = list(names)
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    dem = res.stdout.splitlines() if res.returncode == 0 else names
    return dict(zip(names, dem))


def short(demangled: str) -> str:
    """`ns::(anonymous namespace)::kernel<T, 4>(args)` -> `kernel<T, 4>`: the same for nvcc's and g++'s symbols."""
    s = demangled
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list: the first '(' at template depth 0 after the name
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s.startswith("(anonymous", i):
            cut = i
            break
    s = s[:cut].replace("(anonymous namespace)::", "")
    s = re.sub(r"^.*?::(?=[A-Za-z_0-9]+(<|$))", "", s.split("<")[0]) + (s[s.index("<"):] if "<" in s else "")
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("(bool)1", "true").replace(
        "(bool)0", "false")


def analyse(csrc: Path, arch: str, jobs: int) -> dict:
    nvcc = find_nvcc()
    cuobjdump = find_cuobjdump(nvcc)
    sources = sorted((csrc / "cuda").glob("*.cu"))
    kernels = {}
    out = cache_dir(nvcc, csrc, arch)
    out.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futs = [pool.submit(compile_one, nvcc, cu, csrc, arch, out) for cu in sources]
        for cu, fut in zip(sources, futs):
            cubin, log = fut.result()
            ptxas = parse_ptxas(log)
            threads = parse_max_threads(run([cuobjdump, "-elf", cubin], "cuobjdump -elf"))
            sass = parse_sass(run([cuobjdump, "-sass", cubin], "cuobjdump -sass"))
            dem = demangle(ptxas)
            for name, info in ptxas.items():
                k = dict(info, file=cu.name, mangled=name, name=short(dem[name]),
                         threads=threads.get(name), **hot_loop(sass.get(name, [])))
                if k["threads"]:
                    k.update(occupancy(k["regs"], k["smem"], k["threads"]))
                kernels[k["name"]] = k
    return kernels


# ---- decode ops: real launch configurations from the emulator's dry run --------------------------------------

def decode_ops(lib, m: dict) -> list:
    """(label, [launches], HBM bytes the op must move) for batch-1 decode (T = 1) and a verification (T = 4): the
    standalone ops and the decoder's fused launches (launch_decoder_layers)."""
    import ctypes

    import emulated_cuda as E

    H, nH, nKV, D, I, V = (m[k] for k in ("H", "nH", "nKV", "D", "I", "V"))
    ops = []

    def add(label, call, nbytes):
        try:
            ops.append((label, E.dry_run(lib, call), nbytes))
        except AttributeError:  # a launcher this tree does not have (an older tree: the fused decoder launches)
            pass

    def multi(T, Ns, K):
        n = len(Ns)
        lib.ls_emu_linear_multi(BF16, None, T, K, (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(),
                                (ctypes.c_int64 * n)(*Ns), n)

    for T in (1, VERIFY_T):
        for what, N, K in (("q/o proj", H, H), ("k/v proj", nKV * D, H), ("gate/up proj", I, H), ("down proj", H, I)):
            add(f"linear {what} M={T} [{N}x{K}]", lambda N=N, K=K, T=T: lib.ls_emu_linear(BF16, None, None, None, T, K, N),
                N * K * ELEM)
        add(f"decoder q+k+v M={T} [{nH * D + 2 * nKV * D}x{H}]",
            lambda T=T: multi(T, [nH * D, nKV * D, nKV * D], H), (nH + 2 * nKV) * D * H * ELEM)
        add(f"decoder gate+up M={T} [{2 * I}x{H}]", lambda T=T: multi(T, [I, I], H), 2 * I * H * ELEM)
        add(f"decoder down+residual M={T} [{H}x{I}]",
            lambda T=T: lib.ls_emu_linear_residual(BF16, None, 16, None, None, T, I, H), H * I * ELEM)  # x2 set: gated
        for S in CONTEXTS:
            add(f"cache_attention T={T} ctx={S}", lambda S=S, T=T: lib.ls_emu_cache_attention(
                BF16, None, None, None, None, None, 1, T, nH, nKV, S, D, D ** -0.5,
                *([None] * (len(lib.ls_emu_cache_attention.argtypes) - 13))), 2 * S * nKV * D * ELEM)
        add(f"exit_head_argmax M={T} [{V}x{H}]", lambda T=T: lib.ls_emu_head_argmax(
            BF16, None, None, V, None, T, H, V, None, None, None, None), V * H * ELEM)
    return ops


def decoder_launches(lib, m: dict) -> dict | None:
    """Launches of launch_decoder_layers per layer (the dry run's kernels plus the torch silu it calls back), from
    two layer counts; None for a tree without it."""
    import ctypes

    import emulated_cuda as E

    if not hasattr(lib, "ls_emu_decoder_layers"):
        return None
    H, nH, nKV, D, I = (m[k] for k in ("H", "nH", "nKV", "D", "I"))
    counts = {}
    for L in (1, 2):
        silu_calls = []
        cb = E.SILU_FN(lambda ctx, ptr, n: silu_calls.append(n))
        dims = (ctypes.c_int64 * 10)(1, 1, H, nH, nKV, D, I, 8192, 8192, 1)
        nulls = lambda n: (ctypes.c_void_p * n)()  # noqa: E731
        rec = E.dry_run(lib, lambda: lib.ls_emu_decoder_layers(
            BF16, None, nulls(9 * L), (ctypes.c_int * (2 * L))(), nulls(L), nulls(L), L, dims, None, None, None, None,
            1e-5, D ** -0.5, nulls(8), cb, None))
        counts[L] = (len(rec), len(silu_calls), [short(r["kernel"]).split("<")[0] for r in rec[:len(rec) // L]])
    kernels = counts[2][0] - counts[1][0]
    return dict(kernels_per_layer=kernels, torch_per_layer=counts[2][1] - counts[1][1], sequence=counts[1][2])


def estimate(kernels: dict, ops: list) -> list:
    rows = []
    for label, launches, nbytes in ops:
        main = launches[0]
        k = kernels.get(main["kernel_short"])
        row = dict(op=label, kernel=main["kernel_short"], launches=len(launches), bytes=nbytes,
                   grid=main["grid"], block=main["block"])
        if k is None or not k.get("threads"):
            row["error"] = "kernel not found in the cubins"
            rows.append(row)
            continue
        blocks = main["grid"][0] * main["grid"][1] * main["grid"][2]
        wpb = math.ceil(main["block"][0] * main["block"][1] * main["block"][2] / 32)
        for gpu, g in GPUS.items():
            resident_blocks = min(k["blocks_per_sm"], blocks / g["sms"])
            inflight = resident_blocks * wpb * k["hbm_bytes_per_warp"]
            bw = min(g["bw"], g["sms"] * inflight / LATENCY_S)
            needed = g["bw"] * LATENCY_S / g["sms"]  # bytes in flight per SM that saturate HBM
            row[gpu] = dict(resident_warps_per_sm=resident_blocks * wpb, inflight_bytes_per_sm=inflight,
                            needed_bytes_per_sm=needed, margin=inflight / needed, fraction=bw / g["bw"],
                            us=nbytes / bw * 1e6 if bw else float("inf"))
        rows.append(row)
    return rows


# ---- report --------------------------------------------------------------------------------------------------

def report(kernels: dict, rows: list, quiet: bool, launches: dict | None = None) -> list[str]:
    out = []
    if not quiet:
        out.append("per kernel (sm_90, ptxas -v + cuobjdump SASS): regs, spills (bytes stored/loaded), stack, static smem,"
                   " threads/block, occupancy (blocks/SM, limited by), hot loop: LDG.E.128, load bytes/lane,"
                   " independent loads, HBM bytes in flight/warp, CAS")
        out.append(f"{'kernel':<58} {'regs':>4} {'spill':>7} {'stack':>5} {'smem':>6} {'thr':>5} {'occ':>5} "
                   f"{'blk':>3} {'limit':<9} {'128b':>4} {'B/ln':>5} {'indep':>5} {'HBM B/warp':>10} {'CAS':>3}")
        for name in sorted(kernels):
            k = kernels[name]
            occ = f"{k['occupancy']:.2f}" if "occupancy" in k else "-"
            out.append(f"{name[:58]:<58} {k['regs']:>4} {k['spill_stores']:>3}/{k['spill_loads']:<3} {k['stack']:>5} "
                       f"{k['smem']:>6} {k.get('threads') or '-':>5} {occ:>5} {k.get('blocks_per_sm', '-'):>3} "
                       f"{k.get('limit', '-'):<9} {k['ldg128']:>4} {k['load_bytes']:>5} {k['independent']:>5} "
                       f"{k['hbm_bytes_per_warp']:>10} {k['cas']:>3}")
        out.append("")
        out.append(f"ESTIMATE (Little's law, {LATENCY_S * 1e9:.0f} ns loaded latency, 132 SMs): batch-1 decode of a "
                   f"Llama-3-8B-shaped model, bf16; fraction of HBM bandwidth per op (its main kernel); KB/SM: bytes "
                   f"in flight per SM, xneed: that over what saturates HBM (H100 {3.35e12 * LATENCY_S / 132 / 1024:.1f} KB, "
                   f"H200 {4.8e12 * LATENCY_S / 132 / 1024:.1f} KB); us: the op's bytes at that bandwidth")
        hdr = f"{'op':<44} {'kernel':<40} {'grid':>16} {'warps/SM':>8} {'KB/SM':>6}"
        for gpu in GPUS:
            hdr += f" {gpu + ' frac':>14} {'xneed':>5} {'us':>7}"
        out.append(hdr)
        for r in rows:
            if "error" in r:
                out.append(f"{r['op']:<44} {r['kernel'][:40]:<40} {r['error']}")
                continue
            g0 = r[next(iter(GPUS))]
            line = (f"{r['op']:<44} {r['kernel'][:40]:<40} {'x'.join(map(str, r['grid'])):>16} "
                    f"{g0['resident_warps_per_sm']:>8.1f} {g0['inflight_bytes_per_sm'] / 1024:>6.1f}")
            for gpu in GPUS:
                line += f" {r[gpu]['fraction']:>14.2f} {r[gpu]['margin']:>5.1f} {r[gpu]['us']:>7.1f}"
            out.append(line)
        out.append("")
        if launches:
            out.append(f"launches per decoder layer (T <= 16, the emulator's dry run of launch_decoder_layers): "
                       f"{launches['kernels_per_layer']} kernels + {launches['torch_per_layer']} torch silu = "
                       f"{launches['kernels_per_layer'] + launches['torch_per_layer']} ({', '.join(launches['sequence'])})")
        spills = [n for n, k in kernels.items() if k["spill_stores"] or k["spill_loads"]]
        out.append(f"kernels with spills: {len(spills)}" + (f" ({', '.join(spills)})" if spills else ""))
    fracs = [r[g]["fraction"] for r in rows if "error" not in r for g in GPUS]
    worst = min(fracs) if fracs else 0.0
    out.append(f"estimated fraction of HBM bandwidth, worst decode kernel: {worst:.2f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csrc", type=Path, default=ROOT / "csrc")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quiet", action="store_true", help="only the last line")
    args = ap.parse_args()
    try:
        kernels = analyse(args.csrc.resolve(), args.arch, args.jobs)
    except Missing as e:
        print(f"gpu_static: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("LAYERSKIP_EMU_CSRC", str(args.csrc.resolve()))
    sys.path.insert(0, str(ROOT / "tests"))
    import emulated_cuda as E

    lib = E.library()  # the emulated tests' build (cached by content): only its dry run is used here
    ops = decode_ops(lib, LLAMA3_8B)
    for _, launches, _ in ops:
        for ln in launches:
            ln["kernel_short"] = short(ln["kernel"])
    rows = estimate(kernels, ops)
    launches = decoder_launches(lib, LLAMA3_8B)
    lines = report(kernels, rows, args.quiet, launches)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(dict(kernels=kernels, ops=rows, model=LLAMA3_8B, gpus=GPUS,
                                             latency_s=LATENCY_S, decoder_launches=launches), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
