"""Worker for the 2-rank CPU test (run by torchrun from tests/test_training.py; gloo on 127.0.0.1).

Each rank trains the tiny model under DDP on its half of a fixed global batch, with layer dropout at a high rate
(so some layers keep no row on some rank) and the early-exit loss with distillation, for a few steps; it saves
its losses and gradients (after DDP's all-reduce) of every step to OUT/rank{r}.pt.

    torchrun --nproc_per_node 2 ... tests/dist_worker.py OUT [CORPUS INIT_CONFIG]

With CORPUS and INIT_CONFIG it then runs the training recipe (``run_training``, DDP) into OUT/ddp.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 12


def build(world_size: int, rank: int):
    """The same tiny model and hooks on every rank (and in the single-process reference)."""
    from layerskip_ext.model.llama import LlamaForCausalLM
    from layerskip_ext.training import EarlyExitLossConfig, LayerDropoutConfig, TrainingForward, prepare_model
    from tiny_checkpoints import make_tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(make_tiny_config(num_hidden_layers=4, vocab_size=96)).train()
    loss_fn = prepare_model(model, layer_dropout=LayerDropoutConfig(0.6, scale="uniform", seed=7),
                            early_exit_loss=EarlyExitLossConfig(e_scale=1.0, distill=0.5),
                            rank=rank, world_size=world_size)
    return model, loss_fn, TrainingForward(model, loss_fn)


def global_batches():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 96, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def run(fwd, model, loss_fn, rows: slice, runner=None):
    """Plain SGD steps; returns [(loss, {name: grad}, kept rows per layer)] per step."""
    runner = runner or fwd
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for step, batch in enumerate(global_batches()):
        loss_fn.set_step(step, STEPS)
        part = batch[rows]
        loss, ce, kl = runner(part[:, :-1], part[:, 1:])
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        history.append((float(loss.detach()), grads, loss_fn.layer_dropout.kept_rows()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history


def recipe_config(out: str, corpus: str, init_config: str, batch_size: int):
    from layerskip_ext.training.trainer import TrainConfig

    return TrainConfig(out=out, data=corpus, init_config=init_config, train_tokenizer=300, steps=3,
                       batch_size=batch_size, seq_len=32, lr=3e-3, layer_dropout=0.5, ld_scale="uniform",
                       early_exit=1.0, distill=0.2, autocast="none", progress=False, seed=2)


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, loss_fn, fwd = build(world, rank)
    ddp = torch.nn.parallel.DistributedDataParallel(fwd)
    per = GLOBAL_BATCH // world
    history = run(fwd, model, loss_fn, slice(rank * per, (rank + 1) * per), runner=ddp)
    torch.save(history, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    if len(sys.argv) > 2:   # then the recipe itself, in the same process group: `train` with 2 ranks x batch 2
        from layerskip_ext.training.trainer import run_training
        run_training(recipe_config(os.path.join(out, "ddp"), sys.argv[2], sys.argv[3], batch_size=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
