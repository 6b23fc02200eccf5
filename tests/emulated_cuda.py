"""The emulated-CUDA build and harness: csrc/cuda/kernels.cu compiled by the host C++ compiler with the CUDA
emulator (csrc/cuda/emulator) and AddressSanitizer + UBSan, loaded with ctypes.

Each launcher of csrc/cuda/launchers.h is a function here over CPU tensors that does what csrc/cuda/ops_cuda.cpp
does around it (allocate the outputs and scratch, compose rms_norm + head kernels), with every tensor the kernels
see placed between two guard zones that AddressSanitizer treats as poisoned during the launch, and every output
(and scratch) poisoned before the launch (NaN, or an impossible integer). ops_cuda.cpp itself (guards, streams,
argument checks) is not executed here.

The build is cached by content (sources, flags, compiler): a change to kernels.cu is tested by the next pytest run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = Path(os.environ.get("LAYERSKIP_EMU_CSRC", ROOT / "csrc"))  # another csrc/: tests/kernel_mutations.py
# the translation units with kernels (their __shared__ variables are moved into SHARED_SECTION), then plain C++
KERNELS = sorted((CSRC / "cuda").glob("*.cu")) + [Path(__file__).with_name("cuda_emulator_selftest.cu")]
SOURCES = KERNELS + sorted((CSRC / "cuda").glob("*_host.cpp")) + [CSRC / "cuda" / "emulator" / "emulator.cpp",
                                                                   CSRC / "cuda" / "emulator" / "c_api.cpp"]
# nvcc's rules (--fmad=false, no fast-math) on the host; -O1 keeps the sanitizer build quick to compile.
CXXFLAGS = ["-std=c++20", "-O1", "-g", "-fPIC", "-fno-omit-frame-pointer", "-ffp-contract=off",
            "-fno-strict-aliasing", "-fno-fast-math", "-DLAYERSKIP_CUDA_EMULATOR",
            # grid_1d's cap, small here so the grid-stride loops behind it run (2^20 blocks on a GPU)
            "-DLAYERSKIP_GRID_1D_CAP=4"]
SANITIZE = ["-fsanitize=address,undefined", "-fsanitize-recover=address", "-fno-sanitize=vptr"]
SHARED_SECTION = "ls_emu_shared"  # emulator.cpp poisons it at every block start

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BAD_INDEX = -(2 ** 62)  # what poisoned integer outputs hold
DEVICE_ERRORS = {"vocab_subset": 1, "uniform": 2, "draft": 4}  # csrc/cuda/launchers.h kDeviceError*
# Poisoned guard zone on each side of a tensor: at least 64 bytes, and as large as the tensor, so that a kernel
# overrunning by up to its own size (a dtype read at twice its width, say) lands in poisoned memory and never in
# another allocation (the sanitizer reports and lets the launch go on). A multiple of 16: alignment is kept.


class EmulatorError(AssertionError):
    """A launch reported a problem: a barrier or shuffle misuse, a bad launch configuration, or a sanitizer report."""


class Unavailable(RuntimeError):
    """The emulated build cannot be made here (no C++ compiler, CUDA headers or sanitizer runtime)."""


# ---- the build ------------------------------------------------------------------------------------------------

def cuda_include_dir() -> Path:
    """A folder with cuda_runtime.h, cuda_bf16.h and cuda_fp16.h: the toolkit's, else torch's pip CUDA headers."""
    cands = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
    try:
        import nvidia  # the namespace package of torch's CUDA wheels
        for base in getattr(nvidia, "__path__", []):
            cands += sorted(Path(base).glob("*/include"))
    except ImportError:
        pass
    for c in cands:
        if all((c / h).exists() for h in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h")):
            return c
    raise Unavailable("no CUDA headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h): set CUDA_HOME")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise Unavailable("no C++ compiler (g++) on PATH")
    return cxx


def _run(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emulated CUDA build: {what} failed:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
    return res.stdout


def _build_key(cxx: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(repr(flags).encode())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    files = [f for folder in (CSRC / "cuda", CSRC / "common") for f in sorted(folder.rglob("*")) if f.is_file()]
    for f in files + KERNELS[1:]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    base = os.environ.get("LAYERSKIP_EMU_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerskip_ext" / "cuda_emulated"


def _move_shared_to_section(obj: Path) -> None:
    """A kernel file's zero-initialised data is its __shared__ variables (function-local statics under the
    emulator): rename those sections to SHARED_SECTION, after checking nothing else lives there."""
    sections = sorted(set(re.findall(r"\]\s+(\.bss\S*)\s+NOBITS", _run(["readelf", "-SW", str(obj)], "readelf"))))
    if not sections:
        return
    # objdump -t: address, 7 flag characters, section, size, [.hidden] name
    symbols = re.findall(r"^\S+ (.{7}) (\S+)\s+\S+\s+(?:\.\w+\s+)?(\S+)$", _run(["objdump", "-t", str(obj)], "objdump"),
                         re.M)
    for flags, section, name in symbols:
        if section in sections and "O" in flags and not name.startswith("_ZZ"):
            raise RuntimeError(f"emulated CUDA build: {obj.stem} has zero-initialised data that is not a function-"
                               f"local __shared__ variable ({name}); the emulator would poison it per block")
    renames = [a for s in sections for a in ("--rename-section", f"{s}={SHARED_SECTION}")]
    _run(["objcopy", *renames, str(obj)], "objcopy")


def _check_sanitizers(cxx: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        res = subprocess.run([cxx, *SANITIZE, str(src), "-o", str(Path(tmp) / "probe")], capture_output=True,
                             text=True)
    if res.returncode != 0:
        raise Unavailable(f"{cxx} cannot link AddressSanitizer / UBSan (libasan, libubsan): {res.stderr.strip()[:300]}")


def build(sanitize: bool = True) -> Path:
    """The emulated kernels as a shared library (built once per content, reused after)."""
    cxx = _compiler()
    inc = cuda_include_dir()
    flags = CXXFLAGS + (SANITIZE if sanitize else []) + [f"-I{CSRC}", f"-I{inc}"]
    out_dir = cache_dir() / _build_key(cxx, flags)
    lib = out_dir / "libls_cuda_emu.so"
    if lib.exists():
        return lib
    if sanitize:
        _check_sanitizers(cxx)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        objs, procs = [], []
        for src in SOURCES:
            obj = Path(tmp) / (src.name + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            cmd = [cxx, *flags, *lang, "-c", str(src), "-o", str(obj)]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            objs.append(obj)
        for cmd, p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"emulated CUDA build: compiling failed:\n{' '.join(cmd)}\n{out}")
        for obj in objs[:len(KERNELS)]:
            _move_shared_to_section(obj)
        tmp_lib = Path(tmp) / lib.name
        _run([cxx, "-shared", *(SANITIZE if sanitize else []), *map(str, objs), "-o", str(tmp_lib)], "linking")
        os.replace(tmp_lib, lib)  # atomic: a concurrent run sees the old library or the whole new one
    return lib


# ---- the library ---------------------------------------------------------------------------------------------

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_D = ctypes.c_double
_INT = ctypes.c_int
SILU_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)  # csrc/cuda/launchers.h SiluInPlace
SIGNATURES = {
    "ls_emu_rms_norm": [_INT, _INT, _P, _P, _P, _I, _I, _F],
    "ls_emu_rope": [_INT, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I],
    "ls_emu_kv_cache_write": [_INT, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I],
    "ls_emu_cache_attention": [_INT, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P],
    "ls_emu_attention_scratch": [_I, _I, _I, _I, _I],
    "ls_emu_decoder_attention": [_INT, _P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P],
    "ls_emu_linear": [_INT, _P, _P, _P, _I, _I, _I],
    "ls_emu_linear_multi": [_INT, _P, _I, _I, _P, _P, _P, _INT],
    "ls_emu_linear_residual": [_INT, _P, _P, _P, _P, _I, _I, _I],
    "ls_emu_decoder_layers": [_INT, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _F, _F, _P, SILU_FN, _P],
    "ls_emu_head_argmax": [_INT, _P, _P, _I, _P, _I, _I, _I, _P, _P, _P, _P],
    "ls_emu_head_logits": [_INT, _P, _P, _I, _P, _I, _I, _I, _P, _P],
    "ls_emu_head_sample_rows": [_P, _P, _P, _I, _I, _F, _I, _D, _P, _P, _P, _I],
    "ls_emu_head_sample_scratch": [_I, _I, _I],
    "ls_emu_head_sample_blocks": [_I],
    "ls_emu_head_log_softmax_rows": [_P, _I, _I, _P],
    "ls_emu_verify_greedy": [_P, _P, _P, _P, _P, _I, _I],
    "ls_emu_verify_sampling": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P],
    "ls_emu_selftest_misuse": [_INT, _P],
    "ls_emu_selftest_neighbour": [_P, _INT, _INT],
    "ls_emu_selftest_read_before_write": [_P],
    "ls_emu_selftest_collectives": [_P],
    "ls_emu_selftest_histogram": [_P, _INT, _P, _P],
    "ls_emu_selftest_over_read": [_P, _INT, _P],
    "ls_emu_selftest_shared_over_read": [_P, _INT],
    "ls_emu_set_order": [_INT, ctypes.c_uint64],
    "ls_emu_set_dry_run": [_INT],
    "ls_emu_dry_run_record": [ctypes.c_uint64, _P],
    "ls_emu_set_report_dir": [ctypes.c_char_p],
    "ls_emu_take_error": [ctypes.c_char_p, ctypes.c_size_t],
    "ls_emu_poison": [_P, ctypes.c_size_t],
    "ls_emu_unpoison": [_P, ctypes.c_size_t],
}
RESTYPES = {"ls_emu_take_error": ctypes.c_size_t, "ls_emu_attention_scratch": _I, "ls_emu_head_argmax_blocks": _I, "ls_emu_head_rows_scratch": _I,
            "ls_emu_head_sample_scratch": _I, "ls_emu_head_sample_blocks": _I,
            "ls_emu_verify_sampling_scratch": _I, "ls_emu_switches": ctypes.c_uint64,
            "ls_emu_launches": ctypes.c_uint64, "ls_emu_sanitized": _INT,
            "ls_emu_dry_run_count": ctypes.c_uint64}


def library(sanitize: bool | None = None) -> ctypes.CDLL:
    """The emulated kernels, loaded (once per build kind); sanitize: None = $LAYERSKIP_EMU_SANITIZE (default on)."""
    if sanitize is None:
        sanitize = os.environ.get("LAYERSKIP_EMU_SANITIZE", "1") != "0"
    return _library(sanitize)


@functools.cache
def _library(sanitize: bool) -> ctypes.CDLL:
    path = build(sanitize=sanitize)
    reports = tempfile.mkdtemp(prefix="ls_emu_reports_")
    os.environ["LS_EMU_REPORT_DIR"] = reports  # UBSan reads its log path from here when the library loads
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
    for name, res in RESTYPES.items():
        getattr(lib, name).restype = res
    for name in ("ls_emu_head_argmax_blocks", "ls_emu_head_rows_scratch"):
        getattr(lib, name).argtypes = [_I] if name.endswith("blocks") else [_I, _I]
    lib.ls_emu_verify_sampling_scratch.argtypes = [_I, _I]
    lib.ls_emu_set_report_dir(reports.encode())
    return lib


# ---- guarded tensors -------------------------------------------------------------------------------------------

class Launch:
    """The tensors of one launcher call, each inside its own buffer with poisoned guard zones around it."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.guards: list[tuple[int, int]] = []
        self.keep: list[torch.Tensor] = []
        self.addr: dict[int, int] = {}

    def tensor(self, shape, dtype, fill=None, src: torch.Tensor | None = None, misalign: int = 0) -> torch.Tensor:
        """A new tensor of shape / dtype (filled with fill, or a copy of src) between guard zones; misalign shifts
        its start by that many bytes from a 16-byte boundary (the kernels' vector loads then take their scalar path)."""
        shape = tuple(shape)
        n = 1
        for s in shape:
            n *= s
        item = torch.empty((), dtype=dtype).element_size()
        nbytes = n * item
        guard = max(64, (nbytes + 15) // 16 * 16)
        raw = torch.empty(nbytes + 2 * guard + 32, dtype=torch.uint8)
        base = raw.data_ptr()
        start = guard + (-(base + guard)) % 16 + misalign
        assert start % item == 0, "misalignment must keep the element alignment"
        t = raw[start:start + nbytes].view(dtype).view(shape)
        if src is not None:
            t.copy_(src.reshape(shape))
        elif fill is not None:
            t.fill_(fill)
        self.keep.append(raw)
        self.addr[id(t)] = base + start  # t.data_ptr() is 0 when t is empty: the kernels get this address instead
        self.guards += [(base, start), (base + start + nbytes, raw.numel() - start - nbytes)]
        return t

    def copy(self, src: torch.Tensor | None, misalign: int = 0) -> torch.Tensor | None:
        return None if src is None else self.tensor(src.shape, src.dtype, src=src.contiguous(), misalign=misalign)

    def ptr(self, t: torch.Tensor | None) -> int | None:
        """The address a kernel gets for t (None: a null pointer)."""
        return None if t is None else self.addr.get(id(t), t.data_ptr())

    def output(self, shape, dtype) -> torch.Tensor:
        return self.tensor(shape, dtype, fill=float("nan") if dtype.is_floating_point else BAD_INDEX)

    def run(self, fn: str, *args) -> None:
        for p, n in self.guards:
            self.lib.ls_emu_poison(p, n)
        try:
            getattr(self.lib, fn)(*args)
        finally:
            for p, n in self.guards:
                self.lib.ls_emu_unpoison(p, n)
        take_error(self.lib)


def take_error(lib: ctypes.CDLL) -> None:
    buf = ctypes.create_string_buffer(1 << 16)
    if lib.ls_emu_take_error(buf, len(buf)):
        lines = buf.value.decode(errors="replace").splitlines()
        if len(lines) > 40:  # a sanitizer report's deep stack: its head and its summary say what happened
            lines = lines[:30] + ["    ..."] + [ln for ln in lines[30:] if "SUMMARY" in ln]
        raise EmulatorError("\n".join(lines))




# ---- the launchers, as ops_cuda.cpp wraps them ----------------------------------------------------------------

class Emulated:
    """The CUDA kernels on the CPU. ``order`` (forward / reverse / random) and ``seed`` choose the order in which
    threads resume at every barrier; ``misalign`` shifts every tensor off its 16-byte alignment."""

    def __init__(self, order: str = "forward", seed: int = 0, misalign: int = 0):
        self.lib = library()
        self.order, self.seed, self.misalign = order, seed, misalign
        self.errors = torch.zeros(1, dtype=torch.int32)  # the device error word (ops_cuda.cpp keeps one per device)

    def take_device_errors(self) -> int:
        """The device error word's bits (DEVICE_ERRORS), cleared by reading them, as take_device_errors does."""
        bits = int(self.errors.item())
        self.errors.zero_()
        return bits

    def _launch(self) -> Launch:
        self.lib.ls_emu_set_order(ORDERS[self.order], self.seed)
        return Launch(self.lib)

    def _in(self, L: Launch, t):
        if t is None:
            return None
        item = t.element_size()
        return L.copy(t, -(-self.misalign // item) * item)  # misaligned by at least self.misalign, element-aligned

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        L = self._launch()
        xi, wi = self._in(L, x), self._in(L, w)
        H = x.shape[-1]
        y = L.output(x.shape, x.dtype)
        L.run("ls_emu_rms_norm", DTYPE_CODE[x.dtype], int(w.dtype != x.dtype), L.ptr(xi), L.ptr(wi), L.ptr(y),
              x.numel() // max(H, 1), H, eps)
        return y.clone()

    def rope(self, x, positions, cos, sin) -> torch.Tensor:
        L = self._launch()
        B, T, nH, D = x.shape
        xi, pi, ci, si = (self._in(L, t) for t in (x, positions, cos, sin))
        out = L.output(x.shape, x.dtype)
        L.run("ls_emu_rope", DTYPE_CODE[x.dtype], L.ptr(xi), L.ptr(pi), L.ptr(ci), L.ptr(si), L.ptr(out), B, T,
              T if positions.shape[0] == B else 0, nH, D, cos.shape[0])
        return out.clone()

    def kv_cache_write(self, k_cache, v_cache, k, v, start) -> tuple[torch.Tensor, torch.Tensor]:
        L = self._launch()
        B, T, nKV, D = k.shape
        kc, vc, ki, vi, st = (self._in(L, t) for t in (k_cache, v_cache, k, v, start))
        L.run("ls_emu_kv_cache_write", DTYPE_CODE[k.dtype], L.ptr(kc), L.ptr(vc), L.ptr(ki), L.ptr(vi), L.ptr(st), B, T, nKV,
              k_cache.shape[2], D)
        return kc.clone(), vc.clone()

    def _attention_scratch(self, L: Launch, B, T, nH, S, D) -> torch.Tensor:
        return L.output((max(1, self.lib.ls_emu_attention_scratch(B, T, nH, S, D)),), torch.float32)

    def cache_attention(self, q, k_cache, v_cache, start, scale: float) -> torch.Tensor:
        L = self._launch()
        B, T, nH, D = q.shape
        S = k_cache.shape[2]
        qi, kc, vc, st = (self._in(L, t) for t in (q, k_cache, v_cache, start))
        out = L.output(q.shape, q.dtype)
        scratch = self._attention_scratch(L, B, T, nH, S, D)
        L.run("ls_emu_cache_attention", DTYPE_CODE[q.dtype], L.ptr(qi), L.ptr(kc), L.ptr(vc), L.ptr(st), L.ptr(out), B,
              T, nH, k_cache.shape[1], S, D, scale, L.ptr(scratch))
        return out.clone()

    def decoder_attention(self, q, k, v, positions, cos, sin, k_cache, v_cache, start, scale: float):
        """rope + kv_cache_write + cache_attention in the decoder's launches: (out, k_cache, v_cache)."""
        L = self._launch()
        B, T, nH, D = q.shape
        nKV, S = k_cache.shape[1], k_cache.shape[2]
        qi, ki, vi, pi, ci, si, kc, vc, st = (self._in(L, t) for t in (q, k, v, positions, cos, sin, k_cache, v_cache,
                                                                       start))
        out = L.output(q.shape, q.dtype)
        scratch = self._attention_scratch(L, B, T, nH, S, D)
        L.run("ls_emu_decoder_attention", DTYPE_CODE[q.dtype], L.ptr(qi), L.ptr(ki), L.ptr(vi), L.ptr(pi),
              T if positions.shape[0] == B else 0, L.ptr(ci), L.ptr(si), cos.shape[0], L.ptr(kc), L.ptr(vc), L.ptr(st),
              L.ptr(out), B, T, nH, nKV, S, D, scale, L.ptr(scratch))
        return out.clone(), kc.clone(), vc.clone()

    def linear(self, x, w) -> torch.Tensor:
        L = self._launch()
        K, N = x.shape[-1], w.shape[0]
        M = x.numel() // max(K, 1)
        xi, wi = self._in(L, x), self._in(L, w)
        out = L.output((*x.shape[:-1], N), x.dtype)
        L.run("ls_emu_linear", DTYPE_CODE[x.dtype], L.ptr(xi), L.ptr(wi), L.ptr(out), M, K, N)
        return out.clone()

    def linear_multi(self, x, ws) -> list[torch.Tensor]:
        """linear(x, w) for each w of ws in one launch."""
        L = self._launch()
        K = x.shape[-1]
        M = x.numel() // max(K, 1)
        xi = self._in(L, x)
        wis = [self._in(L, w) for w in ws]
        outs = [L.output((*x.shape[:-1], w.shape[0]), x.dtype) for w in ws]
        arr = lambda vals, ty: (ty * len(vals))(*vals)
        L.run("ls_emu_linear_multi", DTYPE_CODE[x.dtype], L.ptr(xi), M, K, arr([L.ptr(w) for w in wis], ctypes.c_void_p),
              arr([L.ptr(o) for o in outs], ctypes.c_void_p), arr([w.shape[0] for w in ws], ctypes.c_int64), len(ws))
        return [o.clone() for o in outs]

    def linear_residual(self, x, w, h, x2=None) -> torch.Tensor:
        """h + linear(x, w) (x * x2 in place of x when x2 is given), rounded as torch's."""
        L = self._launch()
        K, N = x.shape[-1], w.shape[0]
        M = x.numel() // max(K, 1)
        xi, x2i, wi, hi = self._in(L, x), self._in(L, x2), self._in(L, w), self._in(L, h)
        L.run("ls_emu_linear_residual", DTYPE_CODE[x.dtype], L.ptr(xi), L.ptr(x2i), L.ptr(wi), L.ptr(hi), M, K, N)
        return hi.clone()

    def layer_range_forward(self, h, weights, k_caches, v_caches, start, positions, cos, sin, num_heads: int,
                            num_kv_heads: int, eps: float, scale: float):
        """The decoder layers as ops_cuda.cpp runs them for T <= 16 (launch_decoder_layers; silu: torch's, on the
        CPU): (h, k_caches, v_caches)."""
        L = self._launch()
        B, T, H = h.shape
        nl = len(weights) // 9
        dt = h.dtype
        D = weights[1].shape[0] // num_heads
        I = weights[6].shape[0]
        S = k_caches[0].shape[2]
        M = B * T
        hi = self._in(L, h)
        ws = [self._in(L, w) for w in weights]
        kcs, vcs = [self._in(L, c) for c in k_caches], [self._in(L, c) for c in v_caches]
        st, pi, ci, si = (self._in(L, t) for t in (start, positions, cos, sin))
        scratch = [L.output(shape, dt) for shape in ((M, H), (M, num_heads * D), (M, num_kv_heads * D),
                                                    (M, num_kv_heads * D), (M, num_heads * D), (M, I), (M, I))]
        scratch.append(self._attention_scratch(L, B, T, num_heads, S, D))
        gate = scratch[5]

        def silu(ctx, ptr, n):
            assert ptr == L.ptr(gate) and n == gate.numel()
            gate.copy_(torch.nn.functional.silu(gate))

        cb = SILU_FN(silu)
        arr = lambda vals, ty: (ty * len(vals))(*vals)
        dims = [B, T, H, num_heads, num_kv_heads, D, I, S, cos.shape[0], T if positions.shape[0] == B else 0]
        L.run("ls_emu_decoder_layers", DTYPE_CODE[dt], L.ptr(hi), arr([L.ptr(w) for w in ws], ctypes.c_void_p),
              arr([int(weights[l * 9 + i].dtype != dt) for l in range(nl) for i in (0, 5)], ctypes.c_int),
              arr([L.ptr(c) for c in kcs], ctypes.c_void_p), arr([L.ptr(c) for c in vcs], ctypes.c_void_p), nl,
              arr(dims, ctypes.c_int64), L.ptr(st), L.ptr(pi), L.ptr(ci), L.ptr(si), eps, scale,
              arr([L.ptr(t) for t in scratch], ctypes.c_void_p), cb, None)
        return hi.clone(), [c.clone() for c in kcs], [c.clone() for c in vcs]

    # The exit heads: rms_norm into `normed`, then the head kernels (exit_head_* in ops_cuda.cpp).
    def _normed(self, L: Launch, h, norm_weight, eps):
        H = h.shape[-1]
        M = h.numel() // H
        hi, nw = self._in(L, h), self._in(L, norm_weight)
        normed = L.output((M, H), h.dtype)
        L.run("ls_emu_rms_norm", DTYPE_CODE[h.dtype], int(norm_weight.dtype != h.dtype), L.ptr(hi), L.ptr(nw),
              L.ptr(normed), M, H, eps)
        return normed, M, H

    def exit_head_argmax(self, h, norm_weight, eps, lm_head, vocab_subset=None) -> torch.Tensor:
        L = self._launch()
        normed, M, H = self._normed(L, h, norm_weight, eps)
        w, sub = self._in(L, lm_head), self._in(L, vocab_subset)
        V = lm_head.shape[0] if vocab_subset is None else vocab_subset.shape[0]
        nblk = self.lib.ls_emu_head_argmax_blocks(V)
        part_val, part_idx = L.output((M * nblk,), torch.float32), L.output((M * nblk,), torch.int64)
        out = L.output((M,), torch.int64)
        L.run("ls_emu_head_argmax", DTYPE_CODE[h.dtype], L.ptr(normed), L.ptr(w), lm_head.shape[0], L.ptr(sub), M, H, V,
              L.ptr(part_val), L.ptr(part_idx), L.ptr(out), L.ptr(self.errors))
        return out.clone().view(h.shape[:-1])

    def _logits(self, L: Launch, h, norm_weight, eps, lm_head, vocab_subset):
        normed, M, H = self._normed(L, h, norm_weight, eps)
        w, sub = self._in(L, lm_head), self._in(L, vocab_subset)
        V = lm_head.shape[0] if vocab_subset is None else vocab_subset.shape[0]
        logits = L.output((M, V), torch.float32)
        L.run("ls_emu_head_logits", DTYPE_CODE[h.dtype], L.ptr(normed), L.ptr(w), lm_head.shape[0], L.ptr(sub), M, H, V,
              L.ptr(logits), L.ptr(self.errors))
        return logits, sub, M, V

    def exit_head_sample(self, h, norm_weight, eps, lm_head, uniforms, temperature, top_k=0, top_p=1.0,
                         vocab_subset=None, blocks_per_row=0) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks_per_row: 0 as the launcher picks for V; 1 the one-block kernel; > 1 that many blocks a row."""
        L = self._launch()
        probs, sub, M, V = self._logits(L, h, norm_weight, eps, lm_head, vocab_subset)
        u = self._in(L, uniforms)
        scratch = L.output((max(1, self.lib.ls_emu_head_sample_scratch(M, V, blocks_per_row)),), torch.float64)
        tokens = L.output((M,), torch.int64)
        L.run("ls_emu_head_sample_rows", L.ptr(probs), L.ptr(u), L.ptr(sub), M, V, temperature, top_k, top_p,
              L.ptr(scratch), L.ptr(tokens), L.ptr(self.errors), blocks_per_row)
        return tokens.clone().view(h.shape[:-1]), probs.clone().view(*h.shape[:-1], V)

    def exit_head_log_softmax(self, h, norm_weight, eps, lm_head, vocab_subset=None) -> torch.Tensor:
        L = self._launch()
        out, _, M, V = self._logits(L, h, norm_weight, eps, lm_head, vocab_subset)
        scratch = L.output((max(1, self.lib.ls_emu_head_rows_scratch(M, V)),), torch.float64)
        L.run("ls_emu_head_log_softmax_rows", L.ptr(out), M, V, L.ptr(scratch))
        return out.clone().view(*h.shape[:-1], V)

    def verify_greedy(self, drafts, target, positions):
        L = self._launch()
        B, D = drafts.shape
        dr, tg, pos = self._in(L, drafts), self._in(L, target), self._in(L, positions)
        accepted, nxt = L.output((B,), torch.int64), L.output((B,), torch.int64)
        L.run("ls_emu_verify_greedy", L.ptr(dr), L.ptr(tg), L.ptr(pos), L.ptr(accepted), L.ptr(nxt), B, D)
        return accepted.clone(), nxt.clone(), pos.clone()

    def verify_sampling(self, drafts, q, p, uniforms, positions):
        L = self._launch()
        B, D = drafts.shape
        V = p.shape[-1]
        dr, qi, pi, u, pos = (self._in(L, t) for t in (drafts, q, p, uniforms, positions))
        accepted, nxt = L.output((B,), torch.int64), L.output((B,), torch.int64)
        scratch = L.output((max(1, self.lib.ls_emu_verify_sampling_scratch(B, V)),), torch.float64)
        L.run("ls_emu_verify_sampling", L.ptr(dr), L.ptr(qi), L.ptr(pi), L.ptr(u), L.ptr(pos), L.ptr(accepted), L.ptr(nxt), B, D,
              V, L.ptr(scratch), L.ptr(self.errors))
        return accepted.clone(), nxt.clone(), pos.clone()


# ---- dry runs: what a launcher would launch --------------------------------------------------------------------

def dry_run(lib: ctypes.CDLL, call) -> list[dict]:
    """The launches call() makes through the emulated launchers, recorded instead of run (any shape, null
    pointers): [{kernel: demangled name, grid: (x, y, z), block: (x, y, z), smem: dynamic bytes}] in order."""
    lib.ls_emu_set_dry_run(1)
    try:
        call()
    finally:
        lib.ls_emu_set_dry_run(0)
    take_error(lib)
    names = kernel_symbols(lib._name)
    out = []
    rec = (ctypes.c_uint64 * 8)()
    for i in range(lib.ls_emu_dry_run_count()):
        lib.ls_emu_dry_run_record(i, rec)
        v = list(rec)
        out.append(dict(kernel=names.get(v[0], f"?{v[0]:#x}"), grid=tuple(v[1:4]), block=tuple(v[4:7]), smem=v[7]))
    return out


@functools.cache
def kernel_symbols(lib_path: str) -> dict[int, str]:
    """Address (relative to the load address) -> demangled name of every function defined in the library."""
    text = _run(["nm", "--defined-only", "-C", lib_path], "nm")
    syms = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.setdefault(int(parts[0], 16), parts[2])
    return syms
