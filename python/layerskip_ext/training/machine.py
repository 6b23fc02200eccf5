"""What this machine trains fast, measured: the autocast dtype to use, the matmul rate to compare against, and the
FLOPs a training step does (so a run can report its tokens/s as a fraction of what the machine allows).

bf16 autocast is 2-3x faster than fp32 where the CPU has bf16 instructions (AVX-512-BF16, AMX) and 30-100x slower
where it has not (AVX2: torch's bf16 GEMM then runs at 1-20 GFLOP/s against 100-180 for fp32), so "auto" decides
by timing both on a matmul of a training step's size, once per run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import torch

PROBE_SHAPE = (512, 512, 1024)   # M x K @ K x N: a batch of tokens through an MLP-sized matrix (the bf16 choice)
RATE_SHAPE = (1024, 1024, 1024)  # the fp32 rate a run's throughput is compared with
BF16_MIN_GAIN = 1.25             # bf16 must beat fp32 by this much to be worth its rounding


@functools.lru_cache(maxsize=None)
def matmul_gflops(dtype: torch.dtype, device: torch.device, shape=PROBE_SHAPE, reps: int = 5,
                  budget_s: float = 0.5) -> float:
    """Best-of-reps GFLOP/s of one (M, K) @ (K, N) matmul in dtype (stops early past budget_s; once per process
    and device: the machine does not change during a run)."""
    M, K, N = shape
    a = torch.randn(M, K, device=device).to(dtype)
    b = torch.randn(K, N, device=device).to(dtype)
    best, spent = float("inf"), 0.0
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return 2.0 * M * K * N / best / 1e9


@dataclasses.dataclass
class Autocast:
    choice: str    # "bf16" | "none"
    reason: str
    device: torch.device
    fp32_gflops: float
    bf16_gflops: float | None = None

    def context(self):
        if self.choice == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_dict(self) -> dict:
        return {"autocast": self.choice, "reason": self.reason, "fp32_matmul_gflops": round(self.fp32_gflops, 1),
                "bf16_matmul_gflops": None if self.bf16_gflops is None else round(self.bf16_gflops, 1)}


def choose_autocast(name: str, device: torch.device) -> Autocast:
    """"auto" (bf16 where it is measured faster), "bf16" or "none"; the fp32 rate is measured either way (it is
    what a run's throughput is compared with)."""
    fp32 = matmul_gflops(torch.float32, device, RATE_SHAPE)
    if name == "none":
        return Autocast("none", "as asked", device, fp32)
    if name == "bf16":
        return Autocast("bf16", "as asked", device, fp32, matmul_gflops(torch.bfloat16, device, RATE_SHAPE))
    isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    small32, small16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
    if small16 < BF16_MIN_GAIN * small32:
        return Autocast("none", f"bf16 matmul {small16:.0f} GFLOP/s vs fp32 {small32:.0f} on this {isa}: fp32 is "
                                f"faster", device, fp32)
    return Autocast("bf16", f"bf16 matmul {small16:.0f} GFLOP/s vs fp32 {small32:.0f} on this {isa}: bf16 is "
                            f"faster", device, fp32, matmul_gflops(torch.bfloat16, device, RATE_SHAPE))


def train_flops_per_token(config, seq_len: int, exits_per_step: float, kept_layer_fraction: float = 1.0) -> float:
    """Forward + backward FLOPs per trained token: 3 x (2 x matmul parameters of the layers run + attention
    4 x context x H per layer, the mean context being (seq_len + 1) / 2) + 3 x 2 x V x H per exit head (the final
    layer's included)."""
    H, L = config.hidden_size, config.num_hidden_layers
    per_layer = 2 * config.layer_matmul_params + 4 * (seq_len + 1) / 2 * config.num_attention_heads * config.head_dim
    return 3.0 * (L * kept_layer_fraction * per_layer + exits_per_step * 2 * config.vocab_size * H)


def throughput(config, loss_fn, cfg, tokens_per_step: int, steps: int, elapsed_s: float, exit_loss_s: float,
               autocast: Autocast) -> dict:
    """A run's training speed against the machine's measured matmul rates (the same run's probe): the fp32 rate
    (what the issue's target measures against: "fraction_of_fp32_rate") and the rate of the dtype it trained in
    (bf16 under bf16 autocast: "fraction_of_matmul_rate", how close it came to what it could reach)."""
    if steps <= 0 or elapsed_s <= 0:
        return {"steps": steps, **autocast.to_dict()}
    L = config.num_hidden_layers
    exits = [len(loss_fn.exits(s)[0]) for s in range(max(0, cfg.steps - steps), cfg.steps)]
    mean_exits = sum(exits) / len(exits)
    ld = loss_fn.layer_dropout
    kept = 1.0 - (sum(ld.rates()) / L if ld is not None else 0.0)
    flops = train_flops_per_token(config, cfg.seq_len, mean_exits, kept)
    tps = tokens_per_step * steps / elapsed_s
    achieved = flops * tps / 1e9
    peak = autocast.bf16_gflops if autocast.choice == "bf16" and autocast.bf16_gflops else autocast.fp32_gflops
    return {"steps": steps, "tokens_per_s": round(tps, 1), "step_s": round(elapsed_s / steps, 3),
            "train_gflop_per_token": round(flops / 1e9, 4), "achieved_gflops": round(achieved, 1),
            "fraction_of_matmul_rate": round(achieved / peak, 3),
            "fraction_of_fp32_rate": round(achieved / autocast.fp32_gflops, 3), "exits_per_step": round(mean_exits, 2),
            "kept_layer_fraction": round(kept, 3), "exit_loss_share": round(exit_loss_s / elapsed_s, 3),
            **autocast.to_dict()}
