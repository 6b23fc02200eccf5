"""One-shot GPU benchmark: copy bandwidth, every native op on decode shapes, end-to-end decoding (+ lossless check).

    python benchmarks/gpu_bench.py --device cuda --out $OUT/gpu_bench.json [--smollm2 PATH.gguf] [--budget-s 240]
    python benchmarks/gpu_bench.py --device cpu --small --out /tmp/gpu_bench.json    # smoke test, ~1 min on 2 cores

Normally run by benchmarks/gpu_check.sh (build + CUDA tests + this); docs/gpu.md says what is measured.

(a) bandwidth: a large device-to-device copy (bytes read + written) / time: the ceiling the ops are compared with.
(b) ops: each native op on decode shapes (Llama-2-7B-sized: H 4096, 32 heads, 128 head dim, MLP 11008, vocab 32000;
    attention with GQA 32/8 over a 4096-slot cache), T = 1 (decode) and T = d + 1 (verification). Per call: time
    (back-to-back calls, the median of several blocks after warm-up, CUDA events), the isolated latency of a single
    call, and bytes moved / time (bytes from the shapes: every input read once, every output written once) as GB/s
    and as a share of (a). Inputs rotate over copies whose total exceeds the L2 cache several times, so the weights
    stream from HBM as in a real decode step.
(c) e2e: greedy decode tokens/s of autoregressive, early exit and self-speculative decoding (bf16) on SmolLM2-135M
    (from --smollm2 PATH, else a random model of its shape) and on a random Llama-2-7B-shaped model built on the
    device; AR step time vs the cost of one self-speculative round (d drafts + one verification pass); and
    whether every self-speculative greedy output equals the autoregressive one token for token on this device.
    The random models' layers >= --damp-from have their o_proj/down_proj scaled down, so their last layers barely
    move the residual stream (as in a LayerSkip-trained model) and a pair with E >= damp-from accepts most drafts,
    while E < damp-from accepts almost none: both regimes of the round cost, both paths of the verifier.

The JSON is rewritten after every section, so a run cut short by its time limit still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from layerskip_ext import _native, ops
from layerskip_ext.generation import generate
from layerskip_ext.io import expected_shapes
from layerskip_ext.model import LlamaConfig, LlamaForCausalLM, load_model

EPS = 1e-5
GB = 1e9

# Op shapes. "full": Llama-2-7B-sized (attention with GQA 32/8, as Llama-3-8B); "small": tiny, for the CPU smoke test.
OP_SHAPES = {
    "full": dict(H=4096, nH=32, nKV=8, D=128, S=4096, I=11008, V=32000, d=6, fused_layers=4, fused_nKV=32,
                 fused_S=2048, prefill_T=512),
    "small": dict(H=256, nH=8, nKV=2, D=32, S=512, I=688, V=2048, d=3, fused_layers=2, fused_nKV=8, fused_S=256,
                  prefill_T=48),
}

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TINY_7B = dict(LLAMA2_7B, vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
TINY_SMOLLM2 = dict(SMOLLM2_135M, vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# e2e settings per model kind: (exit layer for early exit, self-speculative (E, d) pairs, damp-from layer)
E2E = {
    "7b": dict(early_exit=16, spec="8:3,16:6", damp_from=16),
    "smollm2": dict(early_exit=15, spec="15:3,24:6", damp_from=24),
    "tiny7b": dict(early_exit=4, spec="2:2,4:3", damp_from=4),
    "tinysmollm2": dict(early_exit=3, spec="2:2,3:3", damp_from=3),
}

CHAT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "chat.txt")


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------
class Clock:
    """Times callables on one device: CUDA events on a GPU (no host timer around asynchronous launches),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def block_ms(self, fns, first: int, count: int) -> float:
        """Milliseconds for `count` back-to-back calls cycling through fns from index `first`."""
        n = len(fns)
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for i in range(count):
                fns[(first + i) % n]()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        for i in range(count):
            fns[(first + i) % n]()
        return (time.perf_counter() - t) * 1e3

    def per_call(self, fns, reps: int, target_ms: float, max_inner: int = 1000) -> dict:
        """Median per-call time of back-to-back calls (blocks of `inner` calls, sized to ~target_ms) and the median
        latency of one isolated call (synchronised before and after), after warming every copy up."""
        for f in fns:
            f()
        self.sync()
        probe = min(self.block_ms(fns, 0, 1) for _ in range(3))
        inner = int(max(1, min(max_inner, math.ceil(target_ms / max(probe, 1e-3)))))
        inner = max(inner, min(len(fns), max_inner))  # touch every copy once per block where affordable
        times = [self.block_ms(fns, r * inner, inner) / inner for r in range(reps)]
        lat = []
        for r in range(min(reps, 10)):
            self.sync()
            lat.append(self.block_ms(fns, r, 1))
        return dict(ms=statistics.median(times), ms_min=min(times), latency_ms=statistics.median(lat), inner=inner,
                    reps=reps)


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {"errors": []}

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        self.data["errors"].append(dict(where=where, error=msg[:2000], traceback=traceback.format_exc()[-4000:]))
        print(f"  !! {where}: {msg[:300]}", flush=True)


def say(msg: str = "") -> None:
    print(msg, flush=True)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ------------------------------------------------------------------------------------------------------------------
# (a) copy bandwidth
# ------------------------------------------------------------------------------------------------------------------
def bench_bandwidth(dev: torch.device, clock: Clock, size_bytes: int, reps: int) -> dict:
    src = torch.empty(size_bytes, dtype=torch.uint8, device=dev)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    fn = [lambda: dst.copy_(src)]
    for _ in range(3):
        fn[0]()
    clock.sync()
    times = [clock.block_ms(fn, 0, 1) for _ in range(reps)]
    ms = statistics.median(times)
    out = dict(bytes_per_copy=size_bytes, bytes_moved=2 * size_bytes, ms_median=ms, ms_min=min(times), reps=reps,
               GBps=2 * size_bytes / (ms / 1e3) / GB, GBps_best=2 * size_bytes / (min(times) / 1e3) / GB,
               how="dst.copy_(src), device to device; bytes read + written / median time")
    return out


# ------------------------------------------------------------------------------------------------------------------
# (b) ops
# ------------------------------------------------------------------------------------------------------------------
def rope_tables(S: int, D: int, dev):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float().to(dev), ang.sin().float().to(dev)


def op_cases(sh: dict, dev: torch.device, dt: torch.dtype):
    """(name, shape text, make() -> {"native": fn, "torch": fn or None}, bytes per call). make() builds one fresh
    set of inputs (called once per pool copy)."""
    H, nH, nKV, D, S, I, V, d = (sh[k] for k in ("H", "nH", "nKV", "D", "S", "I", "V", "d"))
    es = torch.finfo(dt).bits // 8
    Ts = [1, d + 1]
    cos, sin = rope_tables(S, D, dev)
    cases = []

    def rnd(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dtype)

    for T in Ts:
        def mk(T=T):
            x, w = rnd(1, T, H), rnd(H)
            return dict(native=lambda: ops.rms_norm(x, w, EPS), torch=None)
        cases.append(("rms_norm", f"x[1,{T},{H}]", mk, 2 * T * H * es + H * es))
    for T in Ts:
        def mk(T=T):
            x = rnd(1, T, nH, D)
            pos = torch.arange(S - T, S, device=dev).view(1, T)
            return dict(native=lambda: ops.rope(x, pos, cos, sin), torch=None)
        cases.append(("rope", f"q[1,{T},{nH},{D}]", mk, 2 * T * nH * D * es + T * 8 + 2 * T * (D // 2) * 4))
    for T in Ts:
        def mk(T=T):
            kc, vc = rnd(1, nKV, S, D), rnd(1, nKV, S, D)
            k, v = rnd(1, T, nKV, D), rnd(1, T, nKV, D)
            start = torch.tensor([S // 2], device=dev)
            return dict(native=lambda: ops.kv_cache_write(kc, vc, k, v, start), torch=None)
        cases.append(("kv_cache_write", f"k,v[1,{T},{nKV},{D}] into S={S}", mk, 2 * 2 * T * nKV * D * es + 8))
    for T in Ts:
        def mk(T=T):
            q = rnd(1, T, nH, D)
            kc, vc = rnd(1, nKV, S, D), rnd(1, nKV, S, D)
            start = torch.tensor([S - T], device=dev)
            return dict(native=lambda: ops.cache_attention(q, kc, vc, start, D ** -0.5), torch=None)
        # q in, out, the valid part of the K/V cache (here all S slots) once
        cases.append(("cache_attention", f"q[1,{T},{nH},{D}] GQA {nH}/{nKV}, S={S} full", mk,
                      2 * T * nH * D * es + 2 * S * nKV * D * es + 8))
    lin = {"q/o": (H, H), "k/v GQA": (nKV * D, H), "gate/up": (I, H), "down": (H, I)}
    for M in (1, d + 1):
        for kind, (N, K) in lin.items():
            def mk(M=M, N=N, K=K):
                w, x = rnd(N, K, scale=K ** -0.5), rnd(M, K)
                return dict(native=lambda: ops.linear(x, w), torch=lambda: F.linear(x, w))
            cases.append(("linear", f"{kind} M={M} W[{N},{K}]", mk, (N * K + M * K + M * N) * es))
    for M in (1, d + 1):
        def mk(M=M):
            w, nw, h = rnd(V, H, scale=H ** -0.5), rnd(H), rnd(M, H)
            return dict(native=lambda: ops.exit_head_argmax(h, nw, EPS, w),
                        torch=lambda: F.linear(F.rms_norm(h, (H,), nw, EPS), w).argmax(-1))
        cases.append(("exit_head_argmax", f"M={M} head[{V},{H}]", mk, (V * H + M * H + H) * es + M * 8))
    for M in (1, d + 1):
        def mk(M=M):
            w, nw, h = rnd(V, H, scale=H ** -0.5), rnd(H), rnd(M, H)
            u = torch.rand(M, device=dev)
            return dict(native=lambda: ops.exit_head_sample(h, nw, EPS, w, u, 0.8, 0, 0.9), torch=None)
        # the head once, the float32 logits written and read by the sampling passes (about 10 over a row)
        cases.append(("exit_head_sample", f"M={M} head[{V},{H}] top-p 0.9", mk, (V * H + M * H) * es + 10 * M * V * 4))

    def mk_vg():
        drafts = torch.randint(0, V, (1, d), device=dev)
        target = torch.cat((drafts, drafts[:, :1]), 1)
        pos = torch.zeros(1, dtype=torch.int64, device=dev)
        return dict(native=lambda: ops.verify_greedy(drafts, target, pos), torch=None)
    cases.append(("verify_greedy", f"B=1 d={d}", mk_vg, (d + d + 1 + 1 + 2) * 8))

    def mk_vs():
        drafts = torch.randint(0, V, (1, d), device=dev)
        q = torch.softmax(torch.randn(1, d, V, device=dev), -1)
        p = torch.softmax(torch.randn(1, d + 1, V, device=dev), -1)
        u = torch.rand(1, d + 1, device=dev)
        pos = torch.zeros(1, dtype=torch.int64, device=dev)
        return dict(native=lambda: ops.verify_sampling(drafts, q, p, u, pos), torch=None)
    # bytes: the rows the rule reads at most when it rejects (a p row, a q row, one residual pass): 3 * V * 4
    cases.append(("verify_sampling", f"B=1 d={d} V={V} f32", mk_vs, 3 * V * 4))

    L, fS = sh["fused_layers"], sh["fused_S"]
    fcos, fsin = rope_tables(fS, D, dev)

    def layer_case(T, fnKV, start_at, label):
        def mk():
            ws = []
            for _ in range(L):
                ones = torch.ones(H, dtype=dt, device=dev)
                ws += [ones, rnd(nH * D, H, scale=H ** -0.5), rnd(fnKV * D, H, scale=H ** -0.5),
                       rnd(fnKV * D, H, scale=H ** -0.5), rnd(H, nH * D, scale=(nH * D) ** -0.5), ones,
                       rnd(I, H, scale=H ** -0.5), rnd(I, H, scale=H ** -0.5), rnd(H, I, scale=I ** -0.5)]
            kc = [rnd(1, fnKV, fS, D) for _ in range(L)]
            vc = [rnd(1, fnKV, fS, D) for _ in range(L)]
            start = torch.tensor([start_at], device=dev)
            pos = (start[:, None] + torch.arange(T, device=dev)[None]).contiguous()
            h = rnd(1, T, H)
            # a prompt reads `start` on the host to choose its path, so it is never replayed from a CUDA graph
            return dict(native=lambda: ops.layer_range_forward(h, ws, kc, vc, start, pos, fcos, fsin, nH, fnKV, EPS,
                                                               D ** -0.5), torch=None, graph=start_at > 0)
        layer_w = (2 * H + 2 * nH * D * H + 2 * fnKV * D * H + 3 * I * H) * es
        kv_read = L * 2 * (start_at + T) * fnKV * D * es
        flops = 2 * T * L * (layer_w // es) + L * 4 * nH * D * T * (start_at + (T + 1) / 2)
        cases.append(("layer_range_forward", f"{L} layers ({label}) T={T} ctx={start_at}", mk,
                      L * layer_w + kv_read + 2 * T * H * es, flops if start_at == 0 else None))

    for T in Ts:  # decode / verification: the batch-invariant kernels (launch_decoder_layers)
        layer_case(T, sh["fused_nKV"], fS // 2, f"7B-shaped, MHA {nH}/{sh['fused_nKV']}")
    layer_case(1, nKV, fS // 2, f"GQA {nH}/{nKV}")
    # a prompt (start 0, T > 16): cuBLAS + SDPA on a GPU (csrc/cuda/prefill_cuda.h); its row reports TFLOP/s
    layer_case(sh["prefill_T"], nKV, 0, f"GQA {nH}/{nKV}, prompt")
    return cases


def bench_ops(rep: Report, sh: dict, dev: torch.device, dt: torch.dtype, clock: Clock, bw_GBps: float | None,
              pool_bytes: int, reps: int, target_ms: float, deadline: float, graphs: bool) -> list:
    """Pass 1: every op called eagerly (what a decode step pays: host dispatch + kernel). Pass 2 (CUDA): the same
    calls captured in a CUDA graph and replayed, which leaves the device time alone (tiny decode-shaped ops are
    bound by the host's launch rate when called eagerly). GBps / pct_of_copy_bw use the graph time when there is
    one, else the eager time."""
    rows = rep.data.setdefault("ops", [])
    say(f"\n(b) native ops, {str(dt).replace('torch.', '')} on {dev}, eager calls; GB/s = bytes from the shapes / "
        f"median time per call; %bw = share of the copy bandwidth; torch = torch's own F.linear / rms_norm+linear+argmax")
    say(f"{'op':<20} {'shape':<48} {'us/call':>9} {'lat us':>8} {'GB/s':>8} {'%bw':>6} {'torch us':>9}")
    kept = []  # (row, pool) for the graph pass
    for case in op_cases(sh, dev, dt):
        name, shape, make, nb = case[:4]
        flops = case[4] if len(case) > 4 else None  # compute-bound rows (a prompt): TFLOP/s too
        if time.monotonic() > deadline:
            rows.append(dict(op=name, shape=shape, skipped="time budget"))
            continue
        try:
            copies = 1 if dev.type == "cpu" else int(max(1, min(64, math.ceil(pool_bytes / max(nb, 1)))))
            made = [make() for _ in range(copies)]
            r = clock.per_call([m["native"] for m in made], reps, target_ms)
            row = dict(op=name, shape=shape, bytes=nb, copies=copies, us=r["ms"] * 1e3, us_min=r["ms_min"] * 1e3,
                       latency_us=r["latency_ms"] * 1e3, inner=r["inner"], reps=r["reps"],
                       GBps_eager=nb / (r["ms"] / 1e3) / GB)
            row["GBps"] = row["GBps_eager"]
            if flops:
                row["flops"] = flops
                row["TFLOPs"] = flops / (r["ms"] / 1e3) / 1e12
            if bw_GBps:
                row["pct_of_copy_bw"] = 100 * row["GBps"] / bw_GBps
            if made[0]["torch"] is not None:
                t = clock.per_call([m["torch"] for m in made], reps, target_ms)
                row["torch_us"] = t["ms"] * 1e3
            clock.sync()
            rows.append(row)
            pct = f"{row['pct_of_copy_bw']:6.1f}" if "pct_of_copy_bw" in row else "     -"
            tus = f"{row['torch_us']:9.1f}" if "torch_us" in row else "        -"
            say(f"{name:<20} {shape:<48} {row['us']:9.1f} {row['latency_us']:8.1f} {row['GBps']:8.1f} {pct} {tus}"
                + (f"  {row['TFLOPs']:.1f} TFLOP/s" if "TFLOPs" in row else ""))
            if graphs and clock.cuda and made[0].get("graph", True):
                kept.append((row, [m["native"] for m in made]))
            del made
        except Exception as e:  # noqa: BLE001 - record and go on with the next op
            rows.append(dict(op=name, shape=shape, error=f"{type(e).__name__}: {e}"[:1000]))
            rep.error(f"ops/{name} {shape}", e)
        rep.save()
    if not kept:
        return rows
    say("\n(b') the same calls replayed from a CUDA graph (device time, no host dispatch)")
    say(f"{'op':<20} {'shape':<48} {'us/call':>9} {'eager us':>9} {'GB/s':>8} {'%bw':>6}")
    while kept:
        row, fns = kept.pop(0)
        if time.monotonic() > deadline:
            row["graph_skipped"] = "time budget"
            continue
        try:
            g = graph_per_call(fns, min(row["inner"], 256), reps)
            row.update(graph_us=g["ms"] * 1e3, graph_us_min=g["ms_min"] * 1e3, graph_calls=g["calls"],
                       GBps_graph=row["bytes"] / (g["ms"] / 1e3) / GB)
            row["GBps"] = row["GBps_graph"]
            if row.get("flops"):
                row["TFLOPs"] = row["flops"] / (g["ms"] / 1e3) / 1e12
            if bw_GBps:
                row["pct_of_copy_bw"] = 100 * row["GBps"] / bw_GBps
            pct = f"{row['pct_of_copy_bw']:6.1f}" if "pct_of_copy_bw" in row else "     -"
            say(f"{row['op']:<20} {row['shape']:<48} {row['graph_us']:9.1f} {row['us']:9.1f} {row['GBps']:8.1f} {pct}")
        except Exception as e:  # noqa: BLE001
            row["graph_error"] = f"{type(e).__name__}: {e}"[:1000]
            rep.error(f"ops-graph/{row['op']} {row['shape']}", e)
        del fns
        rep.save()
    return rows


def graph_per_call(fns, calls: int, reps: int) -> dict:
    """Per-call time of `calls` calls (cycling through fns) captured in one CUDA graph, median of `reps` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as PyTorch's CUDA graph notes ask
        for f in fns[:3]:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    del graph
    return dict(ms=statistics.median(times), ms_min=min(times), calls=calls)


# ------------------------------------------------------------------------------------------------------------------
# (c) end to end
# ------------------------------------------------------------------------------------------------------------------
def synthetic_model(cfg_kw: dict, dev: torch.device, dt: torch.dtype, seed: int, damp_from: int | None,
                    damp: float) -> LlamaForCausalLM:
    """A Llama model with the real structure and random weights, created directly on the device: embeddings N(0, 1),
    linears N(0, 1/fan_in), norms 1; o_proj/down_proj of layers >= damp_from scaled by `damp`."""
    cfg = LlamaConfig(**cfg_kw)
    g = torch.Generator(device=dev).manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=dt, device=dev)
        if len(shape) == 1:
            t.fill_(1.0)
        elif name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            t.normal_(0.0, 1.0, generator=g)
        else:
            std = shape[1] ** -0.5
            if damp_from is not None and (".o_proj." in name or ".down_proj." in name):
                if int(name.split(".")[2]) >= damp_from:
                    std *= damp
            t.normal_(0.0, std, generator=g)
        sd[name] = t
    model = LlamaForCausalLM.from_state_dict(cfg, sd, dtype=dt)
    model.build_decoder()
    return model


def load_real(path: str, dev: torch.device, dt: torch.dtype):
    return load_model(path, dtype=dt, hugepages=False, device=dev)


def weight_bytes(model) -> int:
    """Bytes of weights one full-model decode step reads (embedding excluded unless tied to the head)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def bench_e2e(rep: Report, label: str, model, prompts: list[list[int]], new_tokens: int, early_exit: int | None,
              pairs: list[tuple[int, int]], clock: Clock, bw_GBps: float | None, deadline: float,
              notes: str = "") -> dict:
    wb = weight_bytes(model)
    entry = dict(model=label, notes=notes, layers=model.num_layers, dtype=str(model.dtype).replace("torch.", ""),
                 device=str(model.device), backend=model.decoder.name, weight_bytes=wb, prompts=len(prompts),
                 prompt_tokens=[len(p) for p in prompts], new_tokens=new_tokens, rows=[])
    if bw_GBps:
        entry["ar_floor_ms"] = wb / (bw_GBps * GB) * 1e3
    rep.data.setdefault("e2e", []).append(entry)
    say(f"\n(c) {label}: {model.num_layers} layers, {wb / 1e6:.0f} MB of weights per step, {entry['dtype']} on "
        f"{model.device}, backend {model.decoder.name}, {len(prompts)} prompts x {new_tokens} new tokens"
        + (f"; AR floor {entry['ar_floor_ms']:.3f} ms/token at the copy bandwidth" if bw_GBps else ""))
    say(f"{'strategy':<28} {'tok/s':>8} {'ms/step|round':>14} {'x AR step':>9} {'tok/round':>9} {'accept':>7} "
        f"{'==AR':>5}")

    def run(p, strategy, n=new_tokens, **kw):
        clock.sync()
        r = generate(model, p, strategy=strategy, max_new_tokens=n, stop_token_ids=[], **kw)
        clock.sync()
        return r

    configs = [("autoregressive", {})]
    if early_exit is not None:
        configs.append((f"early_exit E={early_exit}", dict(exit_layer=early_exit)))
    configs += [(f"self_speculative E={E} d={d}", dict(exit_layer=E, num_speculations=d)) for E, d in pairs]
    if model.device.type == "cuda":  # the same steps / rounds replayed as CUDA graphs (generation/cuda_graph.py)
        configs.append(("autoregressive graph", dict(cuda_graph=True)))
        configs += [(f"self_speculative E={E} d={d} graph", dict(exit_layer=E, num_speculations=d, cuda_graph=True))
                    for E, d in pairs]
    ar_tokens, ar_step = None, None
    for name, kw in configs:
        strategy = name.split()[0]
        if time.monotonic() > deadline:
            entry["rows"].append(dict(strategy=name, skipped="time budget"))
            continue
        try:
            run(prompts[0], strategy, n=min(new_tokens, 12), **kw)  # warm-up (allocations, first launches)
            results = [run(p, strategy, **kw) for p in prompts]
            toks = [r.sequences[0].tokens for r in results]
            n_dec = [len(t) - 1 for t in toks]
            row = dict(strategy=name, tokens_per_s=statistics.median(r.decode_tokens_per_s for r in results),
                       decode_s=[r.decode_s for r in results], prefill_s=[r.prefill_s for r in results])
            if strategy == "self_speculative":
                rounds = [r.stats["rounds"] for r in results]
                row.update(round_ms=statistics.median(r.decode_s / max(k, 1) * 1e3 for r, k in zip(results, rounds)),
                           tokens_per_round=sum(n_dec) / max(sum(rounds), 1), rounds=rounds,
                           acceptance=sum(r.stats["accepted_tokens"] for r in results)
                           / max(sum(r.stats["draft_tokens"] for r in results), 1))
                if ar_step:
                    row["round_cost_in_ar_steps"] = row["round_ms"] / ar_step
                    row["break_even_tokens_per_round"] = row["round_cost_in_ar_steps"]
                if ar_tokens is not None:
                    row["equals_ar"] = toks == ar_tokens
                    row["first_mismatch"] = [next((i for i, (a, b) in enumerate(zip(t, a_)) if a != b), None)
                                             for t, a_ in zip(toks, ar_tokens)]
            else:
                row["step_ms"] = statistics.median(r.decode_s / max(k, 1) * 1e3 for r, k in zip(results, n_dec))
                if strategy == "autoregressive" and bw_GBps:
                    row["fraction_of_floor"] = entry["ar_floor_ms"] / row["step_ms"]
                if name == "autoregressive":
                    ar_tokens, ar_step = toks, row["step_ms"]
                elif ar_step:
                    row["step_vs_ar"] = row["step_ms"] / ar_step
                    if strategy == "autoregressive" and ar_tokens is not None:  # the graphed steps
                        row["equals_ar"] = toks == ar_tokens
            entry["rows"].append(row)
            ms = row.get("round_ms", row.get("step_ms"))
            xar = row.get("round_cost_in_ar_steps", row.get("step_vs_ar", 1.0 if strategy == "autoregressive" else None))
            say(f"{name:<28} {row['tokens_per_s']:8.1f} {ms:14.3f} "
                + (f"{xar:9.2f}" if xar is not None else f"{'-':>9}")
                + (f" {row['tokens_per_round']:9.2f} {row['acceptance']:7.3f} {str(row.get('equals_ar', '-')):>5}"
                   if "round_ms" in row else f" {'-':>9} {'-':>7} {str(row.get('equals_ar', '-')):>5}"))
        except Exception as e:  # noqa: BLE001
            entry["rows"].append(dict(strategy=name, error=f"{type(e).__name__}: {e}"[:1000]))
            rep.error(f"e2e/{label}/{name}", e)
        rep.save()
    return entry


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split(":")) for x in text.split(",") if x]


# ------------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes and models (CPU smoke test)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_bench.json, else ./gpu_bench.json)")
    ap.add_argument("--smollm2", default=None, help="SmolLM2-135M checkpoint (.gguf or HF folder) for (c); "
                                                    "without it a random model of its shape is used")
    ap.add_argument("--sections", default="bandwidth,ops,e2e")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None, help="random-prompt length for the synthetic models")
    ap.add_argument("--spec-7b", default=None, help="E:d pairs for the 7B-shaped model (default 8:3,16:6)")
    ap.add_argument("--spec-smollm2", default=None, help="E:d pairs for SmolLM2 (default 15:3,24:6)")
    ap.add_argument("--damp", type=float, default=0.05)
    ap.add_argument("--no-damp", action="store_true", help="plain random synthetic models (no damped layers)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replay pass of (b)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        say("gpu_bench: --device cuda but torch.cuda.is_available() is False")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dt = getattr(torch, args.dtype)
    small = args.small
    out = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_bench.json")
    rep = Report(out)
    clock = Clock(dev)
    sections = set(args.sections.split(","))

    info = _native.build_info()
    meta = dict(device=str(dev), small=small, dtype=args.dtype, torch=torch.__version__,
                torch_cuda=torch.version.cuda, python=platform.python_version(), host=platform.node(),
                threads=torch.get_num_threads(), build_info=info, native=ops.native_available(), args=vars(args),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    l2 = 0
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        l2 = int(getattr(p, "L2_cache_size", 0) or 0)
        meta.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_GiB=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}", l2_bytes=l2)
        if not info.get("cuda_compiled"):
            meta["warning"] = "the extension was built without CUDA kernels: native ops cannot run on the GPU"
    rep.data["meta"] = meta
    rep.save()
    say(f"gpu_bench on {meta.get('gpu', dev)}: torch {torch.__version__}, native={ops.native_available()}, "
        f"cuda_compiled={info.get('cuda_compiled')} archs={info.get('cuda_archs')}, small={small} -> {out}")
    if meta.get("warning"):
        say("WARNING: " + meta["warning"])

    # (a)
    bw = None
    if "bandwidth" in sections:
        try:
            size = (64 << 20) if small else (2 << 30)
            r = bench_bandwidth(dev, clock, size, reps=5 if small else 10)
            rep.data["bandwidth"] = r
            bw = r["GBps"]
            say(f"\n(a) copy bandwidth: {r['GBps']:.1f} GB/s (median of {r['reps']}; best {r['GBps_best']:.1f}) "
                f"copying {size / 2 ** 20:.0f} MiB")
        except Exception as e:  # noqa: BLE001
            rep.error("bandwidth", e)
        rep.save()

    # (b)
    if "ops" in sections:
        if not ops.native_available():
            rep.data["ops_skipped"] = "native extension not built"
            say("(b) skipped: native extension not built")
        else:
            sh = OP_SHAPES["small" if small else "full"]
            rep.data["op_shapes"] = sh
            pool = max(256 << 20, 4 * l2)
            bench_ops(rep, sh, dev, dt, clock, bw, pool, reps=5 if small else 10, target_ms=0.5 if small else 2.0,
                      deadline=deadline, graphs=not args.no_graphs)
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    # (c)
    if "e2e" in sections:
        new_tokens = args.new_tokens or (10 if small else 64)
        n_prompts = args.num_prompts or (2 if small else 3)
        plen = args.prompt_len or (8 if small else 32)
        # SmolLM2: the real checkpoint when given, else a random model of its shape
        kind = "tinysmollm2" if small else "smollm2"
        spec = parse_pairs(args.spec_smollm2 or E2E[kind]["spec"])
        if time.monotonic() < deadline:
            model, label, notes = None, None, ""
            if args.smollm2:
                try:
                    model, tok = load_real(args.smollm2, dev, dt)
                    texts = [t for t in open(CHAT_PROMPTS, encoding="utf-8").read().split("\n\n") if t.strip()]
                    prompts = [tok.encode(t.strip()) for t in texts[:n_prompts]]
                    label, notes = f"SmolLM2-135M ({os.path.basename(args.smollm2)})", "real weights"
                    kind = "smollm2"  # the real model's layer count, even in a --small run
                    spec = parse_pairs(args.spec_smollm2 or ("15:3" if small else E2E[kind]["spec"]))
                    rep.data["smollm2_path"] = args.smollm2
                except Exception as e:  # noqa: BLE001 - fall back to the random model of its shape
                    rep.error(f"e2e/smollm2: loading {args.smollm2}", e)
                    rep.data["smollm2_load_error"] = f"{type(e).__name__}: {e}"[:1000]
                    model = None
            try:
                if model is None:
                    cfg = TINY_SMOLLM2 if small else SMOLLM2_135M
                    damp_from = None if args.no_damp else E2E[kind]["damp_from"]
                    model = synthetic_model(cfg, dev, dt, args.seed + 1, damp_from, args.damp)
                    prompts = random_prompts(n_prompts, plen, cfg["vocab_size"], args.seed + 1)
                    why = "loading --smollm2 failed" if args.smollm2 else "no --smollm2 given"
                    label = ("tiny " if small else "") + f"SmolLM2-135M-shaped random model ({why})"
                    notes = (f"random weights; o_proj/down_proj of layers >= {damp_from} scaled by {args.damp}"
                             if damp_from is not None else "random weights")
                E = min(E2E[kind]["early_exit"], model.num_layers - 1)
                bench_e2e(rep, label, model, prompts, new_tokens, E, spec, clock, bw, deadline, notes)
            except Exception as e:  # noqa: BLE001
                rep.error(f"e2e/{label or 'smollm2-shaped'}", e)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        # Llama-2-7B-shaped random model
        kind = "tiny7b" if small else "7b"
        if time.monotonic() < deadline:
            model = None
            try:
                cfg = TINY_7B if small else LLAMA2_7B
                damp_from = None if args.no_damp else E2E[kind]["damp_from"]
                t0 = time.monotonic()
                model = synthetic_model(cfg, dev, dt, args.seed + 2, damp_from, args.damp)
                clock.sync()
                build_s = time.monotonic() - t0
                prompts = random_prompts(n_prompts, plen, cfg["vocab_size"], args.seed + 2)
                label = ("tiny " if small else "") + "Llama-2-7B-shaped random model"
                notes = (f"random weights built on the device in {build_s:.1f} s"
                         + (f"; o_proj/down_proj of layers >= {damp_from} scaled by {args.damp}"
                            if damp_from is not None else ""))
                spec = parse_pairs(args.spec_7b or E2E[kind]["spec"])
                bench_e2e(rep, label, model, prompts, new_tokens, E2E[kind]["early_exit"], spec, clock, bw, deadline,
                          notes)
            except Exception as e:  # noqa: BLE001
                rep.error("e2e/7b-shaped", e)
            del model
        else:
            rep.data.setdefault("e2e_skipped", []).append("7B-shaped: time budget")

    # lossless summary
    checks = [dict(model=e["model"], strategy=r["strategy"], equals_ar=r["equals_ar"])
              for e in rep.data.get("e2e", []) for r in e["rows"] if "equals_ar" in r]
    rep.data["lossless_greedy"] = dict(
        device=str(dev), checks=checks, all_equal=bool(checks) and all(c["equals_ar"] for c in checks),
        what="self-speculative greedy output == autoregressive greedy output, token for token, same device")
    rep.data["elapsed_s"] = time.monotonic() - t_start
    rep.data["summary"] = summary_lines(rep.data)
    rep.save()
    say("\n" + "\n".join(rep.data["summary"]))
    return 0


def summary_lines(data: dict) -> list[str]:
    m = data.get("meta", {})
    lines = [f"gpu_bench summary ({m.get('gpu', m.get('device'))}, {data.get('elapsed_s', 0):.0f} s)"]
    if "bandwidth" in data:
        lines.append(f"  copy bandwidth: {data['bandwidth']['GBps']:.0f} GB/s")
    op_rows = [r for r in data.get("ops", []) if "us" in r]
    if op_rows:
        bad = [r for r in data.get("ops", []) if "error" in r]
        skipped = [r for r in data.get("ops", []) if "skipped" in r]
        lines.append(f"  ops: {len(op_rows)} measured, {len(bad)} failed, {len(skipped)} skipped")
        for name in ("linear", "exit_head_argmax", "cache_attention", "layer_range_forward"):
            rs = [r for r in op_rows if r["op"] == name]
            if rs:
                best = max(rs, key=lambda r: r["GBps"])
                lines.append(f"    {name}: best {best['GBps']:.0f} GB/s"
                             + (f" ({best['pct_of_copy_bw']:.0f}% of copy)" if "pct_of_copy_bw" in best else "")
                             + f" at {best['shape']}")
    for r in op_rows:
        if "TFLOPs" in r:
            lines.append(f"    {r['op']} {r['shape']}: {r['TFLOPs']:.1f} TFLOP/s ({r['us']:.0f} us)")
    for e in data.get("e2e", []):
        parts = []
        for r in e["rows"]:
            if "tokens_per_s" in r:
                s = f"{r['strategy']}: {r['tokens_per_s']:.1f} tok/s"
                if "round_ms" in r:
                    s += f" (round {r.get('round_cost_in_ar_steps', float('nan')):.2f} AR steps, " \
                         f"acc {r['acceptance']:.2f}, ==AR {r.get('equals_ar')})"
                parts.append(s)
            else:
                parts.append(f"{r['strategy']}: {r.get('error') or r.get('skipped')}")
        lines.append(f"  {e['model']}:")
        lines += [f"    {p}" for p in parts]
    lg = data.get("lossless_greedy", {})
    lines.append(f"  lossless (self-speculative greedy == AR greedy on {lg.get('device')}): {lg.get('all_equal')} "
                 f"({len(lg.get('checks', []))} checks)")
    if data.get("errors"):
        lines.append(f"  errors: {len(data['errors'])} (see JSON 'errors')")
    return lines


if __name__ == "__main__":
    sys.exit(main())
