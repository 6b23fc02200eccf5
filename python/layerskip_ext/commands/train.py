"""``layerskip train``: the LayerSkip recipe (layer dropout + early-exit loss), a new model or continued training.

Under torchrun: ``torchrun --nproc_per_node N -m layerskip_ext.cli train ...`` (DDP or FSDP2).
"""
from __future__ import annotations

import argparse
import json
import os

from ..errors import LayerSkipError
from ..training.scales import EXIT_CURRICULA, EXIT_LOSS_SCALES, LAYER_SCALES, TIME_CURRICULA
from ..training.trainer import TrainConfig, run_training
from .common import layer_list, str_list

NAME = "train"
HELP = "train with layer dropout + early-exit loss (LayerSkip recipe)"


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Train with LayerSkip (layer dropout + early-exit loss): continual pretraining or fine-tuning "
                     "of --model, or a new model from --init-config. Re-running with the same --out resumes.")
    src = p.add_argument_group("model and data")
    src.add_argument("--model", help="checkpoint to continue from: HF folder, .gguf, or packaged name")
    src.add_argument("--init-config", help="JSON file of LlamaConfig fields: train a new model from scratch")
    src.add_argument("--tokenizer", help="HF folder whose tokenizer to use (default: the model's)")
    src.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE tokenizer of this size on the corpus (with --init-config)")
    src.add_argument("--data", required=True, help="corpus: a folder of text/code files, a .jsonl, or a text file")
    src.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    src.add_argument("--max-data-mb", type=float, default=None, help="read at most this many MB of text")
    src.add_argument("--exclude", type=str_list, default=None, metavar="PATH1,PATH2",
                     help="paths inside a folder --data to leave out (e.g. a held-out split)")
    src.add_argument("--out", required=True, help="output folder: the trained model (HF format) + training state")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    opt.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro step (default 8)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro steps per optimizer step (default 1)")
    opt.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    opt.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    opt.add_argument("--lr-layer-dropout", type=float, default=None, metavar="LR",
                     help="peak learning rate to use instead of --lr when --layer-dropout > 0 (the paper trains "
                          "with a higher LR under layer dropout)")
    opt.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 5%% of --steps)")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    opt.add_argument("--autocast", default="auto", choices=("auto", "bf16", "none"),
                     help="bf16 autocast, or fp32 (none); auto (default): bf16 where this machine runs it faster")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--init-std", type=float, default=0.02, help="weight init std for --init-config")

    ls = p.add_argument_group("LayerSkip")
    ls.add_argument("--layer-dropout", type=float, default=0.0, metavar="P_MAX",
                    help="layer dropout p_max in [0, 1] (default 0 = off)")
    ls.add_argument("--ld-scale", default="exponential", help=f"rate by depth: {', '.join(LAYER_SCALES)}")
    ls.add_argument("--ld-time", default="none", help=f"p_max over training: {', '.join(TIME_CURRICULA)}")
    ls.add_argument("--early-exit", type=float, default=0.0, metavar="E_SCALE",
                    help="early-exit loss scale e_scale (default 0 = final-layer loss only)")
    ls.add_argument("--ee-scale", default="sum-l", help=f"exit weights by depth: {', '.join(EXIT_LOSS_SCALES)}")
    ls.add_argument("--ee-curriculum", default="none", help=f"{', '.join(EXIT_CURRICULA)}")
    ls.add_argument("--ee-rotation", type=int, default=2, metavar="R", help="rotational curriculum: every R-th layer")
    ls.add_argument("--ee-gradual-fraction", type=float, default=0.5,
                    help="gradual curriculum: fraction of training after which every exit is on")
    ls.add_argument("--ee-layers", type=layer_list, default=None, metavar="E1,E2,...",
                    help="candidate exits (1-based layer numbers; default all; the last layer is always one)")
    ls.add_argument("--distill", type=float, default=0.0,
                    help="self-distillation weight: KL(final || exit) added per exit, weighted like its loss")
    ls.add_argument("--anchor", type=float, default=0.0,
                    help="with --lora-rank: weight of KL(base final || final), the last layer's loss weight "
                         "times this, keeping the last layer near the base model (its adapters switched off)")
    ls.add_argument("--loss-chunk", type=int, default=None, help="tokens per logits chunk (default ~8M logits)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=0, metavar="R",
                    help="train rank-R LoRA adapters on every decoder linear layer, base weights frozen; the "
                         "output folder is then an adapter (merged into --model at load)")
    lo.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    lo.add_argument("--init-adapter", default=None, metavar="FOLDER",
                    help="start from this adapter's weights (continue an earlier run in a new --out)")

    run = p.add_argument_group("running")
    run.add_argument("--save-every", type=int, default=0, help="save a resumable state every N steps (0 = at end)")
    run.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                     help="stop after this step (state saved); run again to resume")
    run.add_argument("--fresh", action="store_true", help="ignore an existing training state in --out")
    run.add_argument("--dist", default="ddp", choices=("ddp", "fsdp"), help="under torchrun: DDP or FSDP2")
    run.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    run.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (dynamic shapes)")
    run.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    run.add_argument("--threads", type=int, default=None, help="CPU threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def train_config_from_args(args) -> TrainConfig:
    if args.max_data_mb is not None and args.max_data_mb <= 0:
        raise LayerSkipError(f"--max-data-mb must be > 0, got {args.max_data_mb}")
    return TrainConfig(
        out=args.out, data=args.data, model=args.model, init_config=args.init_config, tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer, text_field=args.text_field,
        max_data_bytes=None if args.max_data_mb is None else int(args.max_data_mb * 1e6), exclude=args.exclude,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, lr_layer_dropout=args.lr_layer_dropout, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, layer_dropout=args.layer_dropout,
        ld_scale=args.ld_scale, ld_time=args.ld_time, early_exit=args.early_exit, ee_scale=args.ee_scale,
        ee_curriculum=args.ee_curriculum, ee_rotation=args.ee_rotation,
        ee_gradual_fraction=args.ee_gradual_fraction, ee_layers=args.ee_layers, distill=args.distill,
        anchor=args.anchor,
        loss_chunk=args.loss_chunk, autocast=args.autocast, init_std=args.init_std, seed=args.seed,
        save_every=args.save_every, stop_at=args.stop_at, dist=args.dist,
        activation_checkpointing=args.activation_checkpointing, compile=args.compile, device=args.device,
        threads=args.threads, progress=not args.no_progress, fresh=args.fresh, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, init_adapter=args.init_adapter)


def run(args) -> int:
    summary = run_training(train_config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        exits = " ".join(f"L{e} {v:.3f}" for e, v in summary["exit_losses"].items())
        print(f"trained {summary['step']}/{summary['steps']} steps ({summary['tokens_seen']} tokens, "
              f"{summary['time_s']:.0f}s); last loss {summary['loss']:.4f}; per exit: {exits}")
        perf = summary["throughput"]
        if "tokens_per_s" in perf:
            print(f"{perf['tokens_per_s']:.0f} tokens/s, {perf['achieved_gflops']:.0f} GFLOP/s = "
                  f"{perf['fraction_of_matmul_rate']:.0%} of this machine's {perf['autocast']} matmul rate "
                  f"({perf['fraction_of_fp32_rate']:.0%} of its fp32 rate); exit loss "
                  f"{perf['exit_loss_share']:.0%} of the time (autocast {perf['autocast']}: {perf['reason']})")
        print(f"model: {summary['out']}")
    return 0
