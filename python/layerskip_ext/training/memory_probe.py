"""Peak host memory of the early-exit loss, chunked (fused) vs naive, each in a fresh subprocess.

    python -m layerskip_ext.training.memory_probe                      # SmolLM2-135M shapes, head + exits only
    python -m layerskip_ext.training.memory_probe --full-model         # whole 30-layer model, one training step

Method: the child builds its inputs, resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` = 5),
runs forward + backward, and reports ``VmHWM - VmRSS(before)``: the extra resident memory the step needed.
Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed tensors leave RSS at once (glibc would otherwise
keep blocks under 32 MiB cached, and RSS would count them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> dict:
    # Imported here, in the measuring child, so its baseline resident memory is taken before torch is loaded.
    import torch

    from ..config import LlamaConfig
    from ..model.llama import LlamaForCausalLM
    from .early_exit import EarlyExitLossConfig
    from .prepare import LayerSkipLoss, TrainingForward, prepare_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    L, V, H = args.layers, args.vocab, args.hidden
    exits = sorted({max(1, round(L * (i + 1) / args.exits)) for i in range(args.exits)})
    naive = args.mode == "naive"
    ee = EarlyExitLossConfig(e_scale=1.0, layers=exits, distill=args.distill, naive=naive,
                             chunk_tokens=args.chunk)
    tokens = torch.randint(0, V, (args.batch, args.seq + 1))
    if args.full_model:
        cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=args.intermediate, num_hidden_layers=L,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).train()
        from .trainer import init_weights
        init_weights(model, 0.02, 0)
        loss_fn = prepare_model(model, early_exit_loss=ee)
        fwd = TrainingForward(model, loss_fn)

        def step():
            loss, _, _ = fwd(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            return loss
    else:
        # the loss alone: the exits' hidden states as leaves, the shared norm + tied head as parameters
        cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model.model.layers = torch.nn.ModuleList()   # the layers are not part of this measurement
        model.to_empty(device="cpu")
        torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.02)
        model.lm_head.weight = model.model.embed_tokens.weight
        torch.nn.init.ones_(model.model.norm.weight)
        model.config = cfg
        ee.check_layers(L)
        loss_fn = LayerSkipLoss(model, "layerskip", ee, None, None, L)
        hs = {e: torch.randn(args.batch, args.seq, H, requires_grad=True) for e in set(exits) | {L}}
        labels = tokens[:, 1:]

        def step():
            out = loss_fn(hs, labels)
            out.loss.backward()
            return out.loss
    import gc
    gc.collect()
    rss0 = _status_kb("VmRSS")
    ok = _reset_peak()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
        loss = step()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"mode": args.mode, "full_model": args.full_model, "exits": exits, "batch": args.batch,
            "seq": args.seq, "vocab": V, "hidden": H, "layers": L, "distill": args.distill,
            "autocast_bf16": args.autocast, "chunk": args.chunk,
            "extra_peak_MiB": round((peak - rss0) / 1024, 1), "rss_before_MiB": round(rss0 / 1024, 1),
            "peak_reset_ok": ok, "loss": round(float(loss.detach()), 5), "time_s": round(dt, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerskip_ext.training.memory_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="both", choices=("both", "chunked", "naive"))
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--exits", type=int, default=4, help="number of exits, evenly spaced, the last layer included")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--distill", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast")
    p.add_argument("--full-model", action="store_true", help="measure a whole training step of the full model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    modes = ("chunked", "naive") if args.mode == "both" else (args.mode,)
    results = []
    for mode in modes:
        cmd = [sys.executable, "-m", "layerskip_ext.training.memory_probe", "--child", "--mode", mode]
        for k in ("vocab", "hidden", "intermediate", "layers", "exits", "batch", "seq", "distill", "threads"):
            cmd += [f"--{k}", str(getattr(args, k))]
        if args.chunk:
            cmd += ["--chunk", str(args.chunk)]
        if args.autocast:
            cmd.append("--autocast")
        if args.full_model:
            cmd.append("--full-model")
        # a fixed mmap threshold makes glibc return every large block on free, so RSS tracks live tensors
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res))
    if len(results) == 2:
        c, n = results
        print(f"extra peak RSS: chunked {c['extra_peak_MiB']} MiB, naive {n['extra_peak_MiB']} MiB "
              f"({n['extra_peak_MiB'] / max(c['extra_peak_MiB'], 1e-9):.1f}x); loss {c['loss']} vs {n['loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
