"""End-to-end decode speed: every engine measured in ONE run, on the same prompts, weights and machine state.

    python benchmarks/e2e.py --json benchmarks/results/e2e_smollm2.json --markdown docs/benchmarks.md

(defaults: smollm2-135m, HumanEval prompts, fp32 and bf16 autoregressive, early exit at 8 and 15, self-speculative
at 8:3, 15:3, 24:4 with and without the draft vocabulary, transformers when installed; --llama-cpp adds
llama-cpp-python when it is importable; --pause-pattern stops a background job while measuring, see below).

Rows: our autoregressive decode (each --dtypes), early exit at each E, self-speculative at each (E, d) with the
whole vocabulary and with the draft vocabulary (--draft-vocab: a file, 'auto' = the model's stored one, or
'none'), Hugging Face transformers (autoregressive, same weights), llama.cpp (opt-in). Each row: decode tokens/s
(tokens after the first of each prompt, per second after the first; the median over --runs runs of all prompts,
after a warm-up), and the fraction of the bandwidth floor: floor tokens/s = read bandwidth / weight bytes one
token reads (full model: all layers + head; early exit E: layers < E + head), with the read bandwidth measured
in the same run by a large torch read. Self-speculative rows are put against the full model's floor (they may
exceed 1: that is the point of speculation). Also: acceptance, emitted tokens per round, output == AR greedy.

--profile: the share of a decode step spent outside the native calls (Python, argument handling, small torch
ops), for AR and one self-speculative setting, plus the top Python functions by own time (cProfile).
--kernels: the weight-streaming GB/s of the linear kernels (benchmarks/bench_linear.py's model sweep).
--prefill N (default 512; 0: off): prompt-processing tokens/s on an N-token prompt (the HumanEval prompts
concatenated) for our autoregressive rows' dtypes, transformers and llama.cpp (when those rows run): the time
to the first new token, median of --runs after a warm-up.

CPU machines are shared: --pause-pattern 'PATTERN' sends SIGSTOP to the processes whose command line matches
(pgrep -f; never this process or its parents, whose command lines hold the pattern too) for the measurement and
SIGCONT afterwards, always (also on errors, Ctrl-C and SIGTERM), and after --max-pause seconds at the latest; the
busy share of the machine during the run is reported.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shlex
import signal
import statistics
import subprocess
import sys
import time

import torch

from layerskip_ext import ops
from layerskip_ext.generation import generate
from layerskip_ext.model import load_model
from layerskip_ext.model.hugepages import hugepage_buffer
from layerskip_ext.prompts import humaneval_path, read_prompts

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------------
# machine state
# ----------------------------------------------------------------------------------------------------------------

def _cpu_stat() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:8]]


def busy_share(t0: list[int]) -> float:
    """Share of all cores' time that was busy since t0 (ours included)."""
    now = _cpu_stat()
    total = sum(now) - sum(t0)
    return (total - (now[3] - t0[3])) / total if total else 0.0


def _ancestors() -> set[int]:
    """This process and its parents (a shell whose command line holds the pattern must not be stopped)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class Paused:
    """SIGSTOP the processes matching a pattern (pgrep -f) while inside; SIGCONT on exit, whatever happens. This
    process and its ancestors are never stopped, though their command lines hold the pattern."""

    def __init__(self, pattern: str | None, max_s: float = 330.0):
        self.pattern = pattern
        self.pids: list[int] = []
        self.max_s = max_s  # never hold them longer: resumed early (and `expired` set) if the run overruns
        self.expired = False
        self._timer = None

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def __enter__(self):
        if self.pattern:
            self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
            for s in self._old:  # a kill of this script still resumes them (via __exit__)
                signal.signal(s, lambda *_: sys.exit(1))
            found = subprocess.run(["pgrep", "-f", self.pattern], capture_output=True, text=True).stdout.split()
            mine = _ancestors()
            self.pids = [int(p) for p in found if int(p) not in mine]
        self._signal(signal.SIGSTOP)
        if self.pids:
            import threading

            self._timer = threading.Timer(self.max_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _expire(self) -> None:
        self.expired = True
        self._signal(signal.SIGCONT)
        print(f"pause window of {self.max_s:.0f} s is over: resumed the paused processes; later rows are measured "
              f"with them running", file=sys.stderr)

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        self._signal(signal.SIGCONT)
        if self.pattern:
            for s, h in self._old.items():
                signal.signal(s, h)
        return False


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of the best of `reps` full reads of a large float32 tensor by torch reductions (sum, amax: both
    memory-bound), on 2 MB pages as load_model puts the weights (4 KB pages read ~15% slower here)."""
    x = hugepage_buffer(nbytes).view(torch.float32)
    x.fill_(1.0)
    best = float("inf")
    for read in (torch.sum, torch.amax):
        read(x)
        for _ in range(reps):
            t = time.perf_counter()
            read(x)
            best = min(best, time.perf_counter() - t)
    del x
    return nbytes / best


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------

def weight_bytes(model, exit_layer: int | None = None) -> int:
    """Weight bytes one token reads: layers < exit_layer (all by default), the final norm and the head. The
    embedding's one row is not counted (a tied head is the embedding, counted once as the head)."""
    E = model.num_layers if exit_layer is None else exit_layer
    total = sum(p.numel() * p.element_size() for layer in model.model.layers[:E] for p in layer.parameters())
    total += sum(p.numel() * p.element_size() for p in model.model.norm.parameters())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


# ----------------------------------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------------------------------

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def measure(fn, prompts, runs: int, name: str = "") -> dict:
    """fn(prompt) -> (tokens, decode tokens, decode seconds, stats). One warm-up run (first prompt), then `runs`
    runs over all prompts; a run's tokens/s = its decode tokens / its decode seconds. -> the median and all."""
    log(f"measuring {name}")
    fn(prompts[0])
    speeds, outs, stats = [], [], []
    for _ in range(runs):
        n = s = 0.0
        outs, stats = [], []
        for p in prompts:
            toks, k, dt, st = fn(p)
            n, s = n + k, s + dt
            outs.append(toks)
            stats.append(st)
        speeds.append(n / s if s else 0.0)
    return dict(tokens_per_s=statistics.median(speeds), runs=[round(v, 2) for v in speeds], outs=outs, stats=stats)


def ours(model, n: int, strategy: str = "autoregressive", **kw):
    kw["strategy"] = strategy

    def fn(p):
        r = generate(model, p, max_new_tokens=n, stop_token_ids=[], **kw)
        k = len(r.sequences[0].tokens) - 1
        return r.sequences[0].tokens, k, r.decode_s, r.stats
    return fn


def transformers_engine(model, n: int):
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
    hf.load_state_dict(model.state_dict(), strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    hf = hf.to(model.dtype).eval()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def first_token(p):  # the prompt pass and the first token, as generate runs them
        hf.generate(torch.tensor([p]), max_new_tokens=1, min_new_tokens=1, **kw)

    def fn(p):
        ids = torch.tensor([p])
        t0 = time.perf_counter()
        first_token(p)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
        return out[0, len(p):].tolist(), n - 1, max((t2 - t1) - (t1 - t0), 1e-9), {}
    fn.first_token = first_token
    return fn, transformers.__version__


def prefill_rate(prefill_s, prompt: list[int], runs: int, name: str) -> dict:
    """prefill_s(prompt) -> seconds to the first new token; -> median tokens/s over `runs` after a warm-up."""
    log(f"prefill {name}")
    prefill_s(prompt)
    rates = [len(prompt) / prefill_s(prompt) for _ in range(runs)]
    return dict(tokens_per_s=round(statistics.median(rates), 1), runs=[round(r, 1) for r in rates])


def ours_prefill_s(model):
    return lambda p: generate(model, p, max_new_tokens=1, stop_token_ids=[], strategy="autoregressive").prefill_s


def timed_s(fn):
    def run(p):
        t0 = time.perf_counter()
        fn(p)
        return time.perf_counter() - t0
    return run


def llama_cpp_engine(model_name: str, n: int, threads: int):
    """llama-cpp-python on the GGUF itself (its own quantised weights: not the same numbers as ours)."""
    import llama_cpp  # opt-in; never installed by this script

    from layerskip_ext.io import resolve_model_path

    path = resolve_model_path(model_name)
    if not path.endswith(".gguf"):
        raise RuntimeError(f"llama.cpp needs a GGUF model, got {path}")
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)

    def first_token(p):
        llm.reset()
        for _ in llm.generate(p, temp=0.0, top_k=1, reset=True):
            break

    def fn(p):
        llm.reset()
        times, toks = [], []
        for tok in llm.generate(p, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) >= n:
                break
        return toks, len(toks) - 1, max(times[-1] - times[0], 1e-9), {}
    fn.first_token = first_token
    return fn, llama_cpp.__version__, os.path.getsize(path)


# ----------------------------------------------------------------------------------------------------------------
# profile: where a decode step's time goes
# ----------------------------------------------------------------------------------------------------------------

def profile_steps(model, prompts, n: int, spec: tuple[int, int] | None, draft_vocab) -> dict:
    """Share of decode time outside the native calls of a step (the fused layer ranges, the greedy draft stage,
    the exit head, the verification), measured by timing those calls; plus cProfile's top functions by own time
    (a separate run: cProfile's own overhead would inflate the share)."""
    spent = [0.0]
    kw = dict(strategy="self_speculative", exit_layer=spec[0], num_speculations=spec[1], draft_vocab=draft_vocab) \
        if spec else dict(strategy="autoregressive")
    mark = []

    def on_token(_seq, _tok):  # the first token comes out of the prompt pass: native time from here on is decode
        if not mark:
            mark.append(spent[0])

    plain = model.decoder
    decode = native_decode = steps = 0.0
    try:
        model.build_decoder(plain.kernels.timed(spent))  # the same kernels, each call timed
        generate(model, prompts[0], max_new_tokens=8, stop_token_ids=[], **kw)  # warm-up
        for p in prompts:
            spent[0], mark[:] = 0.0, []
            r = generate(model, p, max_new_tokens=n, stop_token_ids=[], on_token=on_token, **kw)
            decode += r.decode_s
            native_decode += spent[0] - mark[0]
            steps += r.stats.get("rounds", len(r.sequences[0].tokens) - 1)
    finally:
        model.build_decoder(plain.kernels)
    outside = max(decode - native_decode, 0.0)
    prof = cProfile.Profile()
    prof.enable()
    generate(model, prompts[0], max_new_tokens=n, stop_token_ids=[], **kw)
    prof.disable()
    st = pstats.Stats(prof)
    top = []
    for (file, line, name), (cc, nc, tt, ct, callers) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:10]:
        top.append(dict(function=f"{os.path.basename(file)}:{line}({name})", calls=nc, own_ms=round(tt * 1e3, 2)))
    return dict(setting="autoregressive" if spec is None else f"self-speculative E={spec[0]} d={spec[1]}",
                steps=int(steps), step_ms=round(1e3 * decode / max(steps, 1), 3),
                outside_native_ms=round(1e3 * outside / max(steps, 1), 3),
                outside_native_pct=round(100 * outside / decode, 2) if decode else 0.0, cprofile_top=top)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------

def kernel_table(threads: int) -> list[dict]:
    """bench_linear's model sweep (every matrix of the model once, in model order) at M = 1 and 7."""
    sys.path.insert(0, HERE)
    import bench_linear

    rows = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        ws = bench_linear.make_weights(dtype)
        total = sum(w.numel() * w.element_size() for _, w in ws)
        for M in (1, 7):
            xs = {K: torch.randn(M, K).to(dtype) for K in (bench_linear.H, bench_linear.I)}
            for impl, fn in (("native", ops.linear), ("torch", torch.nn.functional.linear)):
                bench_linear.sweep_time(fn, ws, xs, 1)
                best, _ = bench_linear.sweep_time(fn, ws, xs, 5)
                rows.append(dict(impl=impl, dtype=dtype_name, M=M, threads=threads, MB=round(total / 1e6, 1),
                                 sweep_ms=round(best * 1e3, 2), GBps=round(total / best / 1e9, 2)))
        del ws
    return rows


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split(":")) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="autoregressive rows per dtype; the first dtype "
                                                                 "is used for every other row")
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--limit", type=int, default=2, help="prompts per run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="timed runs over all prompts (median reported)")
    ap.add_argument("--early-exit", default="8,15", help="comma-separated exit layers (lossy rows)")
    ap.add_argument("--spec", default="8:3,15:3,24:4", help="comma-separated E:d pairs")
    ap.add_argument("--draft-vocab", default="auto",
                    help="self-speculative rows also run with this draft vocabulary: a file, 'auto' (the model's "
                         "stored one) or 'none' (no such rows)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    ap.add_argument("--llama-cpp", action="store_true", help="add llama-cpp-python (if importable; not installed)")
    ap.add_argument("--profile", action="store_true", help="time outside the native calls per decode step")
    ap.add_argument("--kernels", action="store_true", help="weight-streaming GB/s of the linear kernels")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill rows (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pause-pattern", default=None, help="SIGSTOP processes matching this (pgrep -f) while "
                                                          "measuring, SIGCONT after")
    ap.add_argument("--max-pause", type=float, default=330.0, help="seconds: resume the paused processes after this "
                                                                    "even if the measurement is not done")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="render docs/benchmarks.md from this run")
    ap.add_argument("--acceptance-json", default="", help="comma-separated benchmarks/draft_vocab_acceptance.py "
                                                          "results to include in the markdown")
    ap.add_argument("--loaded-json", default=None, help="an earlier e2e.py result from a loaded machine, shown "
                                                        "next to this run in the markdown")
    ap.add_argument("--commands", default="", help="extra command lines (';'-separated) listed in the markdown, "
                                                   "e.g. how the draft vocabulary was built")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtypes = [d for d in args.dtypes.split(",") if d]
    n = args.new_tokens
    wall0 = time.perf_counter()

    # Loading (GGUF dequantisation) is not measured: done before the pause window.
    models = {}
    for dt in dtypes:
        models[dt] = load_model(args.model, dtype=dt, draft_vocab=None)
    tok = models[dtypes[0]][1]
    texts = read_prompts(humaneval_path() if args.prompts == "humaneval" else args.prompts)[: args.limit]
    prompts = [tok.encode(t) for t in texts]
    long_prompt = []
    if args.prefill:
        for t in read_prompts(humaneval_path()):
            long_prompt += tok.encode(t)
            if len(long_prompt) >= args.prefill:
                break
        long_prompt = long_prompt[:args.prefill]
    main_model = models[dtypes[0]][0]
    dv_arg = args.draft_vocab
    draft_vocab, dv_source = None, None
    if dv_arg != "none":
        from layerskip_ext.model.draft_vocab import load_draft_vocab, stored_draft_vocab_path
        dv_source = stored_draft_vocab_path(args.model) if dv_arg == "auto" else dv_arg
        if dv_source:
            draft_vocab = load_draft_vocab(dv_source, main_model.config.vocab_size)
        else:
            print(f"no draft vocabulary stored with {args.model}: rows without it only", file=sys.stderr)

    rows, profile, kernels, prefill = [], [], [], []
    t_stat = _cpu_stat()
    with Paused(args.pause_pattern, args.max_pause) as paused:
        t_measure = time.perf_counter()
        bandwidth = read_bandwidth()
        ar_out = None
        for dt in dtypes:
            model = models[dt][0]
            m = measure(ours(model, n), prompts, args.runs, f"autoregressive {dt}")
            if ar_out is None:
                ar_out = m["outs"]  # the reference for every "== AR" below (other dtypes compute other numbers)
            rows.append(dict(engine="ours", strategy="autoregressive", dtype=dt, bytes_per_token=weight_bytes(model),
                             **{k: m[k] for k in ("tokens_per_s", "runs")}))
            if long_prompt:
                prefill.append(dict(engine="ours", dtype=dt,
                                    **prefill_rate(ours_prefill_s(model), long_prompt, args.runs, f"ours {dt}")))
        model, dt = main_model, dtypes[0]
        for E in [int(x) for x in args.early_exit.split(",") if x]:
            m = measure(ours(model, n, strategy="early_exit", exit_layer=E), prompts, args.runs, f"early exit {E}")
            rows.append(dict(engine="ours", strategy=f"early exit E={E} (lossy)", dtype=dt, exit_layer=E,
                             bytes_per_token=weight_bytes(model, E), tokens_per_s=m["tokens_per_s"], runs=m["runs"]))
        for E, d in pairs(args.spec):
            for dv_name, dv in (("full", None), ("draft vocab", draft_vocab)):
                if dv_name != "full" and dv is None:
                    continue
                m = measure(ours(model, n, strategy="self_speculative", exit_layer=E, num_speculations=d,
                                 draft_vocab=dv), prompts, args.runs, f"self-speculative {E}:{d} {dv_name}")
                st = m["stats"]
                drafted = sum(s["draft_tokens"] for s in st)
                label = f"self-speculative E={E} d={d}" + (f", draft vocab {int(dv.numel())}" if dv is not None
                                                           else "")
                rows.append(dict(engine="ours", strategy=label, dtype=dt, exit_layer=E, num_speculations=d,
                                 draft_vocab=None if dv is None else int(dv.numel()),
                                 bytes_per_token=weight_bytes(model), tokens_per_s=m["tokens_per_s"], runs=m["runs"],
                                 acceptance=round(sum(s["accepted_tokens"] for s in st) / max(drafted, 1), 4),
                                 tokens_per_round=round(sum(len(o) - 1 for o in m["outs"])
                                                        / max(sum(s["rounds"] for s in st), 1), 3),
                                 equals_ar=m["outs"] == ar_out))
        if not args.no_transformers:
            try:
                fn, version = transformers_engine(model, n)
            except ImportError:
                print("transformers is not installed: no transformers row", file=sys.stderr)
            else:
                m = measure(fn, prompts, args.runs, "transformers")
                rows.append(dict(engine=f"transformers {version}", strategy="autoregressive", dtype=dt,
                                 bytes_per_token=weight_bytes(model), tokens_per_s=m["tokens_per_s"], runs=m["runs"],
                                 equals_ar=m["outs"] == ar_out))
                if long_prompt:
                    prefill.append(dict(engine=f"transformers {version}", dtype=dt,
                                        **prefill_rate(timed_s(fn.first_token), long_prompt, args.runs,
                                                       "transformers")))
        if args.llama_cpp:
            try:
                fn, version, nbytes = llama_cpp_engine(args.model, n, threads)
            except ImportError:
                print("llama-cpp-python is not importable: no llama.cpp row", file=sys.stderr)
            else:
                m = measure(fn, prompts, args.runs, "llama.cpp")
                rows.append(dict(engine=f"llama.cpp (llama-cpp-python {version})", strategy="autoregressive",
                                 dtype="GGUF as stored", bytes_per_token=nbytes, tokens_per_s=m["tokens_per_s"],
                                 runs=m["runs"], equals_ar=m["outs"] == ar_out))
                if long_prompt:
                    prefill.append(dict(engine=f"llama.cpp (llama-cpp-python {version})", dtype="GGUF as stored",
                                        **prefill_rate(timed_s(fn.first_token), long_prompt, args.runs, "llama.cpp")))
        if args.profile:
            log("profile")
            profile.append(profile_steps(model, prompts, n, None, None))
            E, d = pairs(args.spec)[0]
            profile.append(profile_steps(model, prompts, n, (E, d), draft_vocab))
        if args.kernels:
            log("kernels")
            kernels = kernel_table(threads)
        measured_s = time.perf_counter() - t_measure
    busy = busy_share(t_stat)

    ar_tps = rows[0]["tokens_per_s"]
    for r in rows:
        floor = bandwidth / r["bytes_per_token"]
        r["floor_tokens_per_s"] = round(floor, 1)
        r["fraction_of_floor"] = round(r["tokens_per_s"] / floor, 3)
        r["speedup_vs_ar"] = round(r["tokens_per_s"] / ar_tps, 3)
        r["tokens_per_s"] = round(r["tokens_per_s"], 2)
    meta = dict(model=args.model, source=getattr(main_model, "source", ""), threads=threads,
                prompts=len(prompts), prompt_tokens=[len(p) for p in prompts], new_tokens=n, runs=args.runs,
                read_bandwidth_GBps=round(bandwidth / 1e9, 2), machine_busy_share=round(busy, 3),
                paused_processes=len(paused.pids), pause_window_overrun=paused.expired,
                measured_s=round(measured_s, 1), wall_s=round(time.perf_counter() - wall0, 1),
                draft_vocab=dv_source, draft_vocab_size=None if draft_vocab is None else int(draft_vocab.numel()),
                torch=torch.__version__, python=platform.python_version(), cpu=_cpu_name(),
                command="python benchmarks/e2e.py " + shlex.join(sys.argv[1:]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print_table(meta, rows)
    for p in profile:
        print(f"profile {p['setting']}: {p['step_ms']} ms per step, {p['outside_native_ms']} ms "
              f"({p['outside_native_pct']}%) outside the native calls")
    for p in prefill:
        print(f"prefill {p['engine']} {p['dtype']}: {p['tokens_per_s']} tokens/s ({len(long_prompt)}-token prompt)")
    for k in kernels:
        print(f"kernel linear {k['impl']:6s} {k['dtype']:8s} M={k['M']}  {k['GBps']:6.2f} GB/s")
    acceptance = []
    for path in [x for x in args.acceptance_json.split(",") if x]:
        with open(path) as f:
            acceptance.append(json.load(f))
    meta["prefill_prompt_tokens"] = len(long_prompt)
    result = dict(meta=meta, rows=rows, profile=profile, kernels=kernels, acceptance=acceptance, prefill=prefill,
                  commands=[c.strip() for c in args.commands.split(";") if c.strip()])
    if args.loaded_json:
        with open(args.loaded_json) as f:
            result["loaded"] = dict(json.load(f), path=args.loaded_json)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        sys.path.insert(0, HERE)
        from render_benchmarks import render

        with open(args.markdown, "w") as f:
            f.write(render(result, json_path=args.json))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"{meta['model']} threads={meta['threads']} prompts={meta['prompts']} new_tokens={meta['new_tokens']} "
          f"runs={meta['runs']}; read bandwidth {meta['read_bandwidth_GBps']} GB/s; machine busy "
          f"{100 * meta['machine_busy_share']:.0f}%")
    print(f"{'engine':<28} {'strategy':<44} {'dtype':<9} {'tok/s':>7} {'vs AR':>6} {'floor':>6} {'accept':>7} "
          f"{'tok/round':>9} {'==AR':>5}")
    for r in rows:
        acc = f"{r['acceptance']:.3f}" if "acceptance" in r else "-"
        tpr = f"{r['tokens_per_round']:.2f}" if "tokens_per_round" in r else "-"
        print(f"{r['engine']:<28} {r['strategy']:<44} {r['dtype']:<9} {r['tokens_per_s']:>7.1f} "
              f"{r['speedup_vs_ar']:>5.2f}x {r['fraction_of_floor']:>6.2f} {acc:>7} {tpr:>9} "
              f"{str(r.get('equals_ar', '-')):>5}")


if __name__ == "__main__":
    main()
