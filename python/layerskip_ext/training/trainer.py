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
from .machine import choose_autocast, throughput
from .prepare import TrainingForward, compile_layers, prepare_model
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
    autocast: str = "auto"                 # auto (bf16 where measured faster: training/machine.py) | bf16 | none
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
        if self.autocast not in ("auto", "bf16", "none"):
            raise TrainingError(f"--autocast must be auto, bf16 or none, got {self.autocast!r}")
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


def new_model(model_config: "LlamaConfig", cfg: TrainConfig) -> LlamaForCausalLM:
    """A model of this config with fresh weights, as a run from scratch starts (and as the reproduction's plan
    times it): normal(0, init_std) matrices from the run's seed, norms at one, the head tied where the config ties."""
    model = LlamaForCausalLM(model_config)
    init_weights(model, cfg.init_std, cfg.seed)
    return model


def new_optimizer(params: list, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at the run's base LR, weight decay on the matrices only (not the norms' scales)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.base_lr(), betas=tuple(cfg.betas))


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
# the run, in stages (each usable alone: tests and the reproduce pipeline call them)
# ---------------------------------------------------------------------------------------------------------------
class TrainingRun:
    """One training run: ``open`` (processes, folders, the saved state), ``load_data`` (corpus, tokenizer,
    token stream), ``build_model`` (model, LayerSkip hooks, parallelism), ``build_optimizer`` (and resume),
    ``train`` (the steps, logged, saved), ``finish`` (export). ``run_training`` runs them all."""

    def __init__(self, cfg: TrainConfig, log: Optional[Callable[[str], None]] = None):
        cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.rank, self.world, local_rank, self.created_group = setup_distributed()
        self.is_main = self.rank == 0
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self.distributed = self.world > 1
        self.device = pick_device(cfg.device, local_rank)
        self.out = os.path.abspath(os.path.expanduser(cfg.out))
        self.tdir = os.path.join(self.out, "training")
        self.state_path = os.path.join(self.tdir, "state.pt")
        self.tok_dir = os.path.join(self.tdir, "tokenizer")
        self.log_path = os.path.join(self.tdir, "log.jsonl")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise TrainingError(f"--out {self.out} exists and is not a folder")
        if self.is_main:
            os.makedirs(self.tdir, exist_ok=True)
            removed = clean_stale(self.state_path)
            if removed:
                self.say(f"removed {len(removed)} leftover temp file(s) of an interrupted save")
            if cfg.fresh and os.path.exists(self.state_path):
                os.unlink(self.state_path)
                shutil.rmtree(self.tok_dir, ignore_errors=True)
        self.barrier()
        self.state = load_state(self.state_path)
        self.autocast = choose_autocast(cfg.autocast, self.device)
        self.say(f"autocast: {self.autocast.choice} ({self.autocast.reason})")

    def say(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- data ----------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        """The corpus, the tokenizer (trained, given, or the checkpoint's), the token stream and its packing."""
        cfg = self.cfg
        docs = read_corpus(cfg.data, cfg.text_field, cfg.max_data_bytes, cfg.exclude)
        self.ckpt = load_checkpoint(cfg.model, dtype=torch.float32) if cfg.model else None
        if self.state is not None and os.path.isfile(os.path.join(self.tok_dir, "tokenizer.json")):
            tokenizer = Tokenizer.from_hf_folder(self.tok_dir)
        elif cfg.train_tokenizer is not None:
            if self.is_main:
                self.say(f"training a {cfg.train_tokenizer}-token byte-level BPE tokenizer on {len(docs)} documents")
                tokenizer = train_bpe_tokenizer(docs, cfg.train_tokenizer)
                tokenizer.save(self.tok_dir)
            self.barrier()
            if not self.is_main:
                tokenizer = Tokenizer.from_hf_folder(self.tok_dir)
        elif cfg.tokenizer:
            tokenizer = Tokenizer.from_hf_folder(os.path.expanduser(cfg.tokenizer))
            if tokenizer is None:
                raise TrainingError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json or tokenizer.model there")
        else:
            tokenizer = self.ckpt.tokenizer
            if tokenizer is None:
                raise TrainingError(f"{cfg.model} has no tokenizer; pass --tokenizer FOLDER")
        if self.is_main and not os.path.isfile(os.path.join(self.tok_dir, "tokenizer.json")):
            tokenizer.save(self.tok_dir)
        self.tokenizer = tokenizer
        self.model_config = self.ckpt.config if self.ckpt is not None else read_init_config(cfg.init_config,
                                                                                             tokenizer)
        if tokenizer.vocab_size > self.model_config.vocab_size:
            raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                                f"{self.model_config.vocab_size}")
        if cfg.seq_len > self.model_config.max_position_embeddings:
            raise TrainingError(f"--seq-len {cfg.seq_len} exceeds the model's context "
                                f"({self.model_config.max_position_embeddings})")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else \
            (self.model_config.eos_token_ids or [None])[0]
        self.stream = tokenize_corpus(docs, tokenizer, eos)
        self.fingerprint = stream_fingerprint(self.stream)
        self.data = PackedSequences(self.stream, cfg.seq_len)
        self.mconf = dataclasses.asdict(self.model_config)
        if self.state is not None:
            check_resume(self.state, cfg, self.mconf, self.fingerprint, self.world, self.state_path)

    # ---- model ---------------------------------------------------------------------------------------------
    def build_model(self) -> None:
        """The model (a checkpoint, or new weights), LoRA adapters, the LayerSkip hooks, DDP / FSDP2."""
        cfg = self.cfg
        if self.ckpt is not None:
            model = LlamaForCausalLM.from_state_dict(self.ckpt.config, self.ckpt.state_dict, dtype=torch.float32)
            self.ckpt = None
        else:
            model = new_model(self.model_config, cfg)
        self.lora_alpha = None
        if cfg.lora_rank:
            self.lora_alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank)
            apply_lora(model, cfg.lora_rank, self.lora_alpha, ALL_LINEARS, seed=cfg.seed)
            if cfg.init_adapter and self.state is None:
                meta, tensors = read_adapter(os.path.expanduser(cfg.init_adapter))
                if meta["rank"] != cfg.lora_rank or float(meta["alpha"]) != self.lora_alpha:
                    raise TrainingError(f"--init-adapter has rank {meta['rank']} / alpha {meta['alpha']}; this "
                                        f"run uses --lora-rank {cfg.lora_rank} / alpha {self.lora_alpha}")
                load_adapter_state_(model, tensors)
                self.say(f"starting from adapter {cfg.init_adapter}")
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        model.train()
        self.model = model
        self.loss_fn = prepare_model(model, layer_dropout=cfg.dropout_config(), early_exit_loss=cfg.exit_config(),
                                     activation_checkpointing=cfg.activation_checkpointing)
        self.fwd = TrainingForward(model, self.loss_fn).to(self.device)
        state = self.state
        if state is not None and cfg.lora_rank:
            load_adapter_state_(model, state["model"])
        elif state is not None:
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as e:
                raise CheckpointError(f"training state {self.state_path} does not fit this model: "
                                      f"{str(e).splitlines()[0]}") from None
            if self.loss_fn.layer_dropout is not None:
                self.loss_fn.layer_dropout.load_state_dict(state["layer_dropout"])
        self.runner: torch.nn.Module = self.fwd
        self.fsdp = False
        if self.distributed:
            if cfg.dist == "fsdp":
                try:  # FSDP2: torch >= 2.6, and only where torch.distributed is built
                    from torch.distributed.fsdp import fully_shard
                except ImportError:
                    raise TrainingError("--dist fsdp needs torch.distributed.fsdp.fully_shard (FSDP2; torch >= "
                                        "2.6)") from None
                try:
                    for layer in model.model.layers:
                        fully_shard(layer)
                    fully_shard(self.fwd)
                except Exception as e:  # noqa: BLE001
                    raise TrainingError(f"FSDP2 is not usable here ({type(e).__name__}: {e}); use --dist ddp") \
                        from None
                self.fsdp = True
            else:
                self.runner = DDP(self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            compile_layers(model)

    # ---- optimizer and resume ------------------------------------------------------------------------------
    def build_optimizer(self) -> None:
        cfg = self.cfg
        self.params = [p for p in self.fwd.parameters() if p.requires_grad]
        self.opt = new_optimizer(self.params, cfg)
        self.start_step = 0
        self.order = BatchOrder(self.data, cfg.seed)
        state = self.state
        if state is None:
            return
        if self.fsdp:
            set_optimizer_state_dict(self.fwd, self.opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(state["optimizer"])
        self.start_step = int(state["step"])
        self.order.consumed = int(state["data_consumed"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if self.start_step >= cfg.steps:
            self.say(f"{self.out}: training already complete ({self.start_step}/{cfg.steps} steps)")
        else:
            self.say(f"resuming {self.out} at step {self.start_step}/{cfg.steps}")

    # ---- state ---------------------------------------------------------------------------------------------
    def save(self, step: int) -> dict:
        """The resumable state at ``step`` (rank 0 writes it); -> the model's state dict."""
        cfg = self.cfg
        if self.fsdp:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.fwd, options=opts)
            msd = {k[len("model."):]: v for k, v in msd.items() if k.startswith("model.")}
            osd = get_optimizer_state_dict(self.fwd, self.opt, options=opts)
        elif cfg.lora_rank:
            msd = adapter_state_dict(self.model)     # the resumable state holds the adapters only: small
            osd = self.opt.state_dict()
        else:
            msd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            osd = self.opt.state_dict()
        if self.is_main:
            ld = self.loss_fn.layer_dropout
            blob = {"version": STATE_VERSION, "step": step, "model": msd, "optimizer": osd,
                    "data_consumed": self.order.consumed, "model_config": self.mconf,
                    "train_config": dataclasses.asdict(cfg), "data_fingerprint": self.fingerprint,
                    "world_size": self.world, "layer_dropout": ld.state_dict() if ld else None,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "numpy": np.random.get_state()}}
            save_state(blob, self.state_path)
        self.barrier()
        return msd

    # ---- the steps -----------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """One optimizer step (its micro steps, the gradient sync, the update) -> the averaged metrics."""
        cfg = self.cfg
        self.loss_fn.set_step(step, cfg.steps)
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        exits, _, kl_w = self.loss_fn.exits(step)
        acc = torch.zeros(1 + 2 * len(exits), dtype=torch.float32, device=self.device)
        global_micro = cfg.batch_size * self.world
        for micro in range(cfg.grad_accum):
            batch = self.order.next_batch(global_micro, self.rank, self.world).to(self.device, non_blocking=True)
            tokens, labels = batch[:, :-1], batch[:, 1:]
            last_micro = micro == cfg.grad_accum - 1
            if self.fsdp:
                self.fwd.set_requires_gradient_sync(last_micro)
                sync = contextlib.nullcontext()
            elif self.distributed and not last_micro:
                sync = self.runner.no_sync()
            else:
                sync = contextlib.nullcontext()
            with sync:
                with self.autocast.context():
                    loss, ce, kl = self.runner(tokens, labels)
                (loss / cfg.grad_accum).backward()
            acc += torch.cat([loss.detach().float().view(1), ce.float(), kl.float()]) / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.distributed:
            dist.all_reduce(acc)
            acc /= self.world
        vals = acc.tolist()
        if not math.isfinite(vals[0]):
            raise TrainingError(f"loss is not finite at step {step} ({vals[0]}); lower --lr")
        return dict(lr=lr, loss=vals[0], exits=dict(zip(exits, vals[1:1 + len(exits)])),
                    kls=dict(zip(exits, vals[1 + len(exits):])), kl_w=kl_w)

    def train(self) -> dict:
        """The steps from the resumed one to --steps (or --stop-at), logged to training/log.jsonl, saved every
        --save-every steps. -> throughput figures (tokens/s, achieved GFLOP/s, the exit loss's share)."""
        cfg = self.cfg
        start = self.start_step
        end_step = max(cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at), start)
        self.end_step = end_step
        tokens_per_step = cfg.batch_size * self.world * cfg.grad_accum * cfg.seq_len
        self.tokens_per_step = tokens_per_step
        if self.is_main and os.path.isfile(self.log_path):
            # steps logged after the state we resume from (a crash between saves) are dropped from the log
            with open(self.log_path, encoding="utf-8") as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start]
            with open(self.log_path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and self.is_main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        self.last = dict(loss=float("nan"), exits={})
        t0 = time.time()
        self.fwd.loss_s = 0.0
        try:
            for step in range(start, end_step):
                m = self.step(step)
                self.last = m
                elapsed = time.time() - t0
                rate = tokens_per_step * (step + 1 - start) / max(elapsed, 1e-9)
                shown = " ".join(f"L{e} {v:.2f}" for e, v in m["exits"].items())
                bar.set_postfix_str(f"loss {m['loss']:.3f} | {shown} | lr {m['lr']:.2e} | {rate:.0f} tok/s")
                bar.update(1)
                if self.is_main:
                    self._log_step(step + 1, m, elapsed)
                done = step + 1
                if cfg.save_every and done % cfg.save_every == 0 and done < end_step:
                    self.save(done)
        finally:
            bar.close()
        elapsed = time.time() - t0
        steps = end_step - start
        self.train_s = elapsed
        return throughput(self.model_config, self.loss_fn, cfg, tokens_per_step, steps, elapsed,
                          self.fwd.loss_s, self.autocast)

    def _log_step(self, step: int, m: dict, elapsed: float) -> None:
        rec = {"step": step, "loss": round(m["loss"], 5), "lr": m["lr"],
               "exits": {str(e): round(v, 5) for e, v in m["exits"].items()},
               "tokens": self.tokens_per_step * step, "time_s": round(elapsed, 2),
               "exit_loss_s": round(self.fwd.loss_s, 3)}
        if any(k > 0 for k in m["kl_w"]):
            L = self.model_config.num_hidden_layers
            rec["distill"] = {str(e): round(v, 5) for e, v in m["kls"].items() if e < L}
            if self.cfg.anchor:
                rec["anchor_kl"] = round(m["kls"][L], 5)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- the end -------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Save the final state and export the model (HF folder) or the adapter into --out."""
        cfg = self.cfg
        exported = os.path.join(self.out, "adapter_config.json" if cfg.lora_rank else "model.safetensors")
        if self.start_step < self.end_step or not os.path.isfile(exported):
            msd = self.save(self.end_step)
            if self.is_main and cfg.lora_rank:
                base = cfg.model if not os.path.exists(os.path.expanduser(cfg.model)) else \
                    os.path.abspath(os.path.expanduser(cfg.model))
                save_adapter(self.out, msd, base_model=base, rank=cfg.lora_rank, alpha=self.lora_alpha,
                             targets=ALL_LINEARS,
                             training={"steps": self.end_step, "tokens": self.tokens_per_step * self.end_step,
                                       "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                                  if k not in ("out", "progress", "fresh", "threads", "device")}})
            elif self.is_main:
                export_hf(self.out, self.model_config, msd, self.tokenizer)
                self.say(f"saved {'model' if self.end_step == cfg.steps else f'step {self.end_step} model'} to "
                         f"{self.out}")
        self.barrier()
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def run_training(cfg: TrainConfig, log: Callable[[str], None] = None) -> dict:
    """Train as configured; returns a summary dict (rank 0's view)."""
    run = TrainingRun(cfg, log)
    run.load_data()
    run.build_model()
    run.build_optimizer()
    perf = run.train()
    run.finish()
    return {"out": run.out, "step": run.end_step, "steps": cfg.steps, "loss": run.last["loss"],
            "exit_losses": run.last["exits"], "tokens_seen": run.tokens_per_step * run.end_step,
            "time_s": round(run.train_s, 2), "world_size": run.world, "dataset_tokens": int(len(run.stream)),
            "throughput": perf}
