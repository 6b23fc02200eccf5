"""The ``layerskip train`` recipe: continual pretraining / fine-tuning / from-scratch training with LayerSkip.

One process or ``torchrun --nproc_per_node N`` (DDP, or FSDP2 ``fully_shard`` with ``dist="fsdp"``). Every rank
reads and tokenizes the corpus the same way; the global batch of each micro step is split by rank, so the
result does not depend on how many processes share it (up to float reduction order).

Output folder ``out``:
    config.json, model.safetensors, tokenizer.json, ...   the model (HF format; ``layerskip generate`` loads it)
    training/state.pt                                      resumable state (model, optimizer, data position, RNG)
    training/tokenizer/                                    the tokenizer the run uses (a resume reuses it)
    training/log.jsonl                                     one line per step: loss, per-exit losses, lr
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..config import LlamaConfig
from ..corpus import read_corpus, tokenize_corpus
from ..errors import CheckpointError, LayerSkipError, TrainingError
from ..io import Tokenizer, load_checkpoint, save_hf_folder
from ..io.adapter import read_adapter, save_adapter
from ..model.llama import LlamaForCausalLM
from ..model.lora import ALL_LINEARS, adapter_state_dict, apply_lora, load_adapter_state_
from .checkpoint import STATE_VERSION, clean_stale, load_state, save_state
from .common import fsync_dir
from .data import BatchOrder, PackedSequences, stream_fingerprint
from .early_exit import EarlyExitLossConfig
from .layer_dropout import LayerDropoutConfig
from .prepare import TrainingForward, prepare_model
from .tokenizer_train import MIN_VOCAB, train_bpe_tokenizer

if TYPE_CHECKING:
    from ..config import LlamaConfig


@dataclasses.dataclass
class TrainConfig:
    out: str
    data: str
    model: Optional[str] = None            # HF folder / GGUF / packaged name to continue from
    init_config: Optional[str] = None      # JSON of LlamaConfig fields: train from scratch
    tokenizer: Optional[str] = None        # HF folder whose tokenizer to use
    train_tokenizer: Optional[int] = None  # train a byte-level BPE tokenizer of this size on the corpus
    text_field: str = "text"
    max_data_bytes: Optional[int] = None
    exclude: Optional[list] = None         # paths inside a folder --data to leave out (a held-out split)
    steps: int = 100
    batch_size: int = 8                    # sequences per rank per micro step
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    lr_layer_dropout: Optional[float] = None  # the LR to use when layer dropout is on (the paper raises it)
    min_lr_ratio: float = 0.1
    warmup: Optional[int] = None           # steps; default 5% of steps
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    layer_dropout: float = 0.0             # p_max
    ld_scale: str = "exponential"
    ld_time: str = "none"
    early_exit: float = 0.0                # e_scale (0: final-layer loss only)
    ee_scale: str = "sum-l"
    ee_curriculum: str = "none"
    ee_rotation: int = 2
    ee_gradual_fraction: float = 0.5
    ee_layers: Optional[list] = None
    distill: float = 0.0
    anchor: float = 0.0                    # KL(base final || final) weight; LoRA only (base = adapters off)
    loss_chunk: Optional[int] = None
    autocast: str = "bf16"                 # bf16 | none
    init_std: float = 0.02
    seed: int = 0
    save_every: int = 0                    # steps between state saves (0: only at the end)
    stop_at: Optional[int] = None          # stop (and save) after this step; a later run resumes
    dist: str = "ddp"                      # ddp | fsdp (under torchrun)
    activation_checkpointing: bool = False
    compile: bool = False                  # torch.compile each decoder layer
    lora_rank: int = 0                     # > 0: train LoRA adapters on every decoder linear, base frozen
    lora_alpha: Optional[float] = None     # default 2 * rank
    init_adapter: Optional[str] = None     # adapter folder to start from (continue an earlier run's adapter)
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = True
    fresh: bool = False                    # ignore (and replace) an existing training state

    def validate(self) -> None:
        if not self.model and not self.init_config:
            raise TrainingError("give --model (continue training a checkpoint) or --init-config (from scratch)")
        if self.model and self.init_config:
            raise TrainingError("--model and --init-config are exclusive")
        if self.init_config and not (self.train_tokenizer or self.tokenizer):
            raise TrainingError("a model from --init-config needs a tokenizer: --train-tokenizer VOCAB_SIZE or "
                                "--tokenizer FOLDER")
        if self.train_tokenizer is not None:
            if not isinstance(self.train_tokenizer, int) or self.train_tokenizer < MIN_VOCAB:
                raise TrainingError(f"--train-tokenizer vocabulary size must be an integer >= {MIN_VOCAB} "
                                    f"(256 bytes + special tokens), got {self.train_tokenizer!r}")
        if self.train_tokenizer is not None and self.tokenizer:
            raise TrainingError("--train-tokenizer and --tokenizer are exclusive")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "init_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise TrainingError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise TrainingError(f"--lr must be > 0, got {self.lr}")
        if self.lr_layer_dropout is not None and not self.lr_layer_dropout > 0:
            raise TrainingError(f"--lr-layer-dropout must be > 0, got {self.lr_layer_dropout}")
        if self.warmup is not None and self.warmup < 0:
            raise TrainingError(f"--warmup must be >= 0, got {self.warmup}")
        if self.autocast not in ("bf16", "none"):
            raise TrainingError(f"--autocast must be bf16 or none, got {self.autocast!r}")
        if self.dist not in ("ddp", "fsdp"):
            raise TrainingError(f"--dist must be ddp or fsdp, got {self.dist!r}")
        if self.save_every < 0:
            raise TrainingError(f"--save-every must be >= 0, got {self.save_every}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise TrainingError(f"--lora-rank must be an integer >= 0, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise TrainingError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.anchor and not self.lora_rank:
            raise TrainingError("--anchor keeps the last layer near the base model, which is the LoRA adapters "
                                "switched off: it needs --lora-rank")
        if self.init_adapter and not self.lora_rank:
            raise TrainingError("--init-adapter needs --lora-rank (the adapter's rank)")
        if self.lora_rank and not self.model:
            raise TrainingError("--lora-rank adapts a pretrained --model; a model from --init-config trains fully")
        if self.lora_rank and self.dist == "fsdp":
            raise TrainingError("LoRA training runs under DDP (--dist ddp): the adapters are small")
        if self.stop_at is not None and self.stop_at < 1:
            raise TrainingError(f"--stop-at must be >= 1, got {self.stop_at}")
        # the component configs validate names and ranges
        self.dropout_config()
        self.exit_config()

    def dropout_config(self) -> Optional[LayerDropoutConfig]:
        cfg = LayerDropoutConfig(p_max=self.layer_dropout, scale=self.ld_scale, time_curriculum=self.ld_time,
                                 seed=self.seed)
        return cfg if cfg.p_max > 0 else None

    def exit_config(self) -> EarlyExitLossConfig:
        return EarlyExitLossConfig(e_scale=self.early_exit, scale=self.ee_scale, curriculum=self.ee_curriculum,
                                   rotation_interval=self.ee_rotation, gradual_fraction=self.ee_gradual_fraction,
                                   layers=self.ee_layers, distill=self.distill, anchor=self.anchor,
                                   chunk_tokens=self.loss_chunk)

    def base_lr(self) -> float:
        if self.layer_dropout > 0 and self.lr_layer_dropout is not None:
            return float(self.lr_layer_dropout)
        return float(self.lr)


# settings that may change between a run and its resume (they do not change what is computed)
RESUMABLE_CHANGES = {"out", "save_every", "stop_at", "progress", "fresh", "compile", "device", "threads",
                     "model", "init_config", "tokenizer", "train_tokenizer", "data", "max_data_bytes", "exclude",
                     "activation_checkpointing", "init_adapter"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the base LR, then cosine decay to ``min_lr_ratio`` of it at the last step."""
    base = cfg.base_lr()
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# set-up pieces
# ---------------------------------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, created): initialises the process group under torchrun."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        created = True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created
    return 0, 1, 0, False


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def read_init_config(path: str, tokenizer) -> "LlamaConfig":

    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise TrainingError(f"cannot read --init-config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise TrainingError(f"--init-config {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"--init-config {path}: expected a JSON object of LlamaConfig fields")
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    ignored = {"architectures", "model_type", "hidden_act", "attention_bias", "mlp_bias"}
    unknown = sorted(set(raw) - names - ignored)
    if unknown:
        raise TrainingError(f"--init-config {path}: unknown field {unknown[0]!r} (LlamaConfig fields: "
                            f"{', '.join(sorted(names))})")
    fields = {k: v for k, v in raw.items() if k in names}
    fields.setdefault("vocab_size", tokenizer.vocab_size)
    fields.setdefault("num_key_value_heads", fields.get("num_attention_heads"))
    if "intermediate_size" not in fields and isinstance(fields.get("hidden_size"), int):
        fields["intermediate_size"] = 64 * math.ceil(fields["hidden_size"] * 8 / 3 / 64)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    missing = [n for n in ("hidden_size", "num_hidden_layers", "num_attention_heads") if n not in fields]
    if missing:
        raise TrainingError(f"--init-config {path}: missing required field(s) {', '.join(missing)}")
    try:
        return LlamaConfig(**fields)
    except LayerSkipError as e:
        raise TrainingError(f"--init-config {path}: {e}") from None
    except TypeError as e:
        raise TrainingError(f"--init-config {path}: {e}") from None


def init_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.fill_(1.0)


_FIRST = ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads",
          "num_key_value_heads")


def _diff(old: dict, new: dict, skip=()) -> Optional[tuple[str, object, object]]:
    keys = set(old) | set(new)
    for k in [k for k in _FIRST if k in keys] + sorted(keys - set(_FIRST)):
        if k in skip:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            return k, a, b
    return None


def check_resume(state: dict, cfg: TrainConfig, model_config: dict, fingerprint: str, world: int,
                 state_path: str) -> None:
    d = _diff(state["model_config"], model_config, skip=("torch_dtype",))
    if d:
        raise CheckpointError(f"training state {state_path} was written for a different model ({d[0]}: "
                              f"{d[1]!r} there, {d[2]!r} now); use another --out or --fresh")
    d = _diff(state["train_config"], dataclasses.asdict(cfg), skip=RESUMABLE_CHANGES)
    if d:
        raise TrainingError(f"cannot resume {state_path}: --{d[0].replace('_', '-')} changed ({d[1]!r} -> "
                            f"{d[2]!r}); rerun with the original settings, or --fresh to start over")
    if state["data_fingerprint"] != fingerprint:
        raise TrainingError(f"cannot resume {state_path}: the dataset's tokens differ from the checkpoint's "
                            f"(fingerprint {state['data_fingerprint']} -> {fingerprint})")
    if state["world_size"] != world:
        raise TrainingError(f"cannot resume {state_path}: it was written by {state['world_size']} process(es), "
                            f"this run has {world}")


def export_hf(out: str, config, state_dict: dict, tokenizer) -> None:
    """Write the HF folder into ``out`` file by file via a temp folder + os.replace (never half-written)."""

    tmp = os.path.join(out, f".export.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_folder(tmp, config, state_dict, tokenizer=tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    for name in sorted(os.listdir(tmp)):
        src = os.path.join(tmp, name)
        os.chmod(src, 0o666 & ~umask)      # safetensors creates its file 0600
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.replace(src, os.path.join(out, name))
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out)


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
def run_training(cfg: TrainConfig, log: Callable[[str], None] = None) -> dict:
    """Train as configured; returns a summary dict (rank 0's view)."""

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, local_rank, created_group = setup_distributed()
    is_main = rank == 0
    log = log or (lambda msg: print(msg, file=sys.stderr))
    say = (lambda msg: log(msg)) if is_main else (lambda msg: None)
    distributed = world > 1

    def barrier():
        if distributed:
            dist.barrier()

    device = pick_device(cfg.device, local_rank)
    out = os.path.abspath(os.path.expanduser(cfg.out))
    tdir = os.path.join(out, "training")
    state_path = os.path.join(tdir, "state.pt")
    tok_dir = os.path.join(tdir, "tokenizer")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainingError(f"--out {out} exists and is not a folder")
    if is_main:
        os.makedirs(tdir, exist_ok=True)
        removed = clean_stale(state_path)
        if removed:
            say(f"removed {len(removed)} leftover temp file(s) of an interrupted save")
        if cfg.fresh and os.path.exists(state_path):
            os.unlink(state_path)
            shutil.rmtree(tok_dir, ignore_errors=True)
    barrier()
    state = load_state(state_path)

    # ---- data, tokenizer, model ------------------------------------------------------------------------------
    docs = read_corpus(cfg.data, cfg.text_field, cfg.max_data_bytes, cfg.exclude)
    ckpt = None
    if cfg.model:
        ckpt = load_checkpoint(cfg.model, dtype=torch.float32)
    if state is not None and os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tokenizer = Tokenizer.from_hf_folder(tok_dir)
    elif cfg.train_tokenizer is not None:
        if is_main:
            say(f"training a {cfg.train_tokenizer}-token byte-level BPE tokenizer on {len(docs)} documents")
            tokenizer = train_bpe_tokenizer(docs, cfg.train_tokenizer)
            tokenizer.save(tok_dir)
        barrier()
        if not is_main:
            tokenizer = Tokenizer.from_hf_folder(tok_dir)
    elif cfg.tokenizer:
        tokenizer = Tokenizer.from_hf_folder(os.path.expanduser(cfg.tokenizer))
        if tokenizer is None:
            raise TrainingError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json or tokenizer.model there")
    else:
        tokenizer = ckpt.tokenizer
        if tokenizer is None:
            raise TrainingError(f"{cfg.model} has no tokenizer; pass --tokenizer FOLDER")
    if is_main and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tokenizer.save(tok_dir)

    if ckpt is not None:
        model_config = ckpt.config
        model = LlamaForCausalLM.from_state_dict(ckpt.config, ckpt.state_dict, dtype=torch.float32)
        del ckpt
    else:
        model_config = read_init_config(cfg.init_config, tokenizer)
        model = LlamaForCausalLM(model_config)
        init_weights(model, cfg.init_std, cfg.seed)
    lora_alpha = None
    if cfg.lora_rank:
        lora_alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank)
        apply_lora(model, cfg.lora_rank, lora_alpha, ALL_LINEARS, seed=cfg.seed)
        if cfg.init_adapter and state is None:
            meta, tensors = read_adapter(os.path.expanduser(cfg.init_adapter))
            if meta["rank"] != cfg.lora_rank or float(meta["alpha"]) != lora_alpha:
                raise TrainingError(f"--init-adapter has rank {meta['rank']} / alpha {meta['alpha']}; this run "
                                    f"uses --lora-rank {cfg.lora_rank} / alpha {lora_alpha}")
            load_adapter_state_(model, tensors)
            say(f"starting from adapter {cfg.init_adapter}")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    if tokenizer.vocab_size > model_config.vocab_size:
        raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                            f"{model_config.vocab_size}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (model_config.eos_token_ids or [None])[0]
    stream = tokenize_corpus(docs, tokenizer, eos)
    del docs
    fingerprint = stream_fingerprint(stream)
    data = PackedSequences(stream, cfg.seq_len)
    if cfg.seq_len > model_config.max_position_embeddings:
        raise TrainingError(f"--seq-len {cfg.seq_len} exceeds the model's context "
                            f"({model_config.max_position_embeddings})")
    mconf = dataclasses.asdict(model_config)
    if state is not None:
        check_resume(state, cfg, mconf, fingerprint, world, state_path)

    # ---- LayerSkip hooks, parallelism, optimizer -------------------------------------------------------------
    loss_fn = prepare_model(model, layer_dropout=cfg.dropout_config(), early_exit_loss=cfg.exit_config(),
                            activation_checkpointing=cfg.activation_checkpointing)
    fwd = TrainingForward(model, loss_fn).to(device)
    if state is not None and cfg.lora_rank:
        load_adapter_state_(model, state["model"])
    elif state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"training state {state_path} does not fit this model: "
                                  f"{str(e).splitlines()[0]}") from None
        if loss_fn.layer_dropout is not None:
            loss_fn.layer_dropout.load_state_dict(state["layer_dropout"])
    runner: torch.nn.Module = fwd
    fsdp = False
    if distributed:
        if cfg.dist == "fsdp":
            try:  # FSDP2: torch >= 2.6, and only where torch.distributed is built
                from torch.distributed.fsdp import fully_shard
            except ImportError:
                raise TrainingError("--dist fsdp needs torch.distributed.fsdp.fully_shard (FSDP2; torch >= 2.6)") \
                    from None
            try:
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(fwd)
            except Exception as e:  # noqa: BLE001
                raise TrainingError(f"FSDP2 is not usable here ({type(e).__name__}: {e}); use --dist ddp") \
                    from None
            fsdp = True
        else:
            runner = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # compile each decoder layer in place (parameter names unchanged); dynamic shapes because the number of
        # kept rows changes from step to step under layer dropout
        for layer in model.model.layers:
            layer.layer.compile(dynamic=True)
    trainable = [p for p in fwd.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.base_lr(), betas=tuple(cfg.betas))

    start_step = 0
    order = BatchOrder(data, cfg.seed)
    if state is not None:
        if fsdp:
            set_optimizer_state_dict(fwd, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        order.consumed = int(state["data_consumed"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if start_step >= cfg.steps:
            say(f"{out}: training already complete ({start_step}/{cfg.steps} steps)")
        else:
            say(f"resuming {out} at step {start_step}/{cfg.steps}")

    # ---- loop ------------------------------------------------------------------------------------------------
    end_step = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    end_step = max(end_step, start_step)
    global_micro = cfg.batch_size * world
    amp = contextlib.nullcontext() if cfg.autocast == "none" else \
        torch.autocast(device.type, dtype=torch.bfloat16)
    params = trainable
    log_path = os.path.join(tdir, "log.jsonl")
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and is_main), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = global_micro * cfg.grad_accum * cfg.seq_len
    last_loss, last_exits = float("nan"), {}
    t0 = time.time()

    def save(step: int) -> dict:
        if fsdp:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(fwd, options=opts)
            msd = {k[len("model."):]: v for k, v in msd.items() if k.startswith("model.")}
            osd = get_optimizer_state_dict(fwd, opt, options=opts)
        elif cfg.lora_rank:
            msd = adapter_state_dict(model)     # the resumable state holds the adapters only: small
            osd = opt.state_dict()
        else:
            msd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            osd = opt.state_dict()
        if is_main:
            blob = {"version": STATE_VERSION, "step": step, "model": msd, "optimizer": osd,
                    "data_consumed": order.consumed, "model_config": mconf,
                    "train_config": dataclasses.asdict(cfg), "data_fingerprint": fingerprint,
                    "world_size": world,
                    "layer_dropout": loss_fn.layer_dropout.state_dict() if loss_fn.layer_dropout else None,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "numpy": np.random.get_state()}}
            save_state(blob, state_path)
        barrier()
        return msd

    if is_main and os.path.isfile(log_path):
        # steps logged after the state we resume from (a crash between saves) are dropped from the log
        with open(log_path, encoding="utf-8") as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        with open(log_path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    try:
        for step in range(start_step, end_step):
            loss_fn.set_step(step, cfg.steps)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            exits, _, kl_w = loss_fn.exits(step)
            acc = torch.zeros(1 + 2 * len(exits), dtype=torch.float32, device=device)
            for micro in range(cfg.grad_accum):
                batch = order.next_batch(global_micro, rank, world).to(device, non_blocking=True)
                tokens, labels = batch[:, :-1], batch[:, 1:]
                last_micro = micro == cfg.grad_accum - 1
                if fsdp:
                    fwd.set_requires_gradient_sync(last_micro)
                    sync = contextlib.nullcontext()
                elif distributed and not last_micro:
                    sync = runner.no_sync()
                else:
                    sync = contextlib.nullcontext()
                with sync:
                    with amp:
                        loss, ce, kl = runner(tokens, labels)
                    (loss / cfg.grad_accum).backward()
                acc += torch.cat([loss.detach().float().view(1), ce.float(), kl.float()]) / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if distributed:
                dist.all_reduce(acc)
                acc /= world
            vals = acc.tolist()
            if not all(math.isfinite(v) for v in vals[:1]):
                raise TrainingError(f"loss is not finite at step {step} ({vals[0]}); lower --lr")
            last_loss = vals[0]
            last_exits = dict(zip(exits, vals[1:1 + len(exits)]))
            kls = dict(zip(exits, vals[1 + len(exits):]))
            if is_main:
                elapsed = time.time() - t0
                rate = tokens_per_step * (step + 1 - start_step) / max(elapsed, 1e-9)
                shown = " ".join(f"L{e} {v:.2f}" for e, v in last_exits.items())
                bar.set_postfix_str(f"loss {last_loss:.3f} | {shown} | lr {lr:.2e} | {rate:.0f} tok/s")
                bar.update(1)
                rec = {"step": step + 1, "loss": round(last_loss, 5), "lr": lr,
                       "exits": {str(e): round(v, 5) for e, v in last_exits.items()},
                       "tokens": tokens_per_step * (step + 1), "time_s": round(elapsed, 2)}
                if any(k > 0 for k in kl_w):
                    L = model_config.num_hidden_layers
                    rec["distill"] = {str(e): round(v, 5) for e, v in kls.items() if e < L}
                    if cfg.anchor:
                        rec["anchor_kl"] = round(kls[L], 5)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < end_step:
                save(done)
    finally:
        bar.close()
    exported = os.path.join(out, "adapter_config.json" if cfg.lora_rank else "model.safetensors")
    if start_step < end_step or not os.path.isfile(exported):
        msd = save(end_step)
        if is_main and cfg.lora_rank:
            base = cfg.model if not os.path.exists(os.path.expanduser(cfg.model)) else \
                os.path.abspath(os.path.expanduser(cfg.model))
            save_adapter(out, msd, base_model=base, rank=cfg.lora_rank, alpha=lora_alpha, targets=ALL_LINEARS,
                         training={"steps": end_step, "tokens": tokens_per_step * end_step,
                                   "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                              if k not in ("out", "progress", "fresh", "threads", "device")}})
        elif is_main:
            export_hf(out, model_config, msd, tokenizer)
            say(f"saved {'model' if end_step == cfg.steps else f'step {end_step} model'} to {out}")
    barrier()
    if created_group and dist.is_initialized():
        dist.destroy_process_group()
    return {"out": out, "step": end_step, "steps": cfg.steps, "loss": last_loss,
            "exit_losses": last_exits, "tokens_seen": tokens_per_step * end_step,
            "time_s": round(time.time() - t0, 2), "world_size": world, "dataset_tokens": int(len(stream))}
