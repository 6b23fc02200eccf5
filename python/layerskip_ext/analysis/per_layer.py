"""Per-layer early-exit quality (the paper's Figure 1 / Table 1 view).

For every layer E, the shared exit head (final norm + LM head) on layer E's output gives a next-token
distribution; we report its next-token accuracy, perplexity (exp of the mean cross-entropy) and top-1
agreement with the last layer. Logits are computed in token chunks, one layer at a time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import torch
from tqdm import tqdm

from ..errors import TrainingError
from ..training.early_exit import default_chunk
from ..training.prepare import layer_outputs, model_kind


@dataclasses.dataclass
class LayerMetrics:
    layer: int          # 1-based: the output of the first `layer` layers
    accuracy: float     # top-1 == next token
    perplexity: float   # exp(mean cross-entropy)
    loss: float         # mean cross-entropy (nats)
    agreement: float    # top-1 == the last layer's top-1
    tokens: int


def _head_fn(model):

    if model_kind(model) == "layerskip":
        return model.head
    return lambda h: model.lm_head(model.model.norm(h))


@torch.no_grad()
def per_layer_metrics(model, sequences: torch.Tensor, batch_size: int = 4, layers: Optional[Iterable[int]] = None,
                      chunk_tokens: Optional[int] = None, progress: bool = False) -> list[LayerMetrics]:
    """sequences [n, T + 1] token ids (inputs + targets). ``layers``: 1-based layer numbers (default all)."""

    was_training = model.training
    model.eval()
    try:
        L = model.config.num_hidden_layers
        layers = sorted(set(range(1, L + 1) if layers is None else (int(x) for x in layers)))
        bad = [e for e in layers if not 1 <= e <= L]
        if bad:
            raise TrainingError(f"layer {bad[0]} is outside [1, {L}]")
        if sequences.dim() != 2 or sequences.shape[1] < 2:
            raise TrainingError("analysis needs sequences of at least 2 tokens")
        head = _head_fn(model)
        vocab = model.config.vocab_size
        chunk = chunk_tokens or default_chunk(vocab)
        dev = next(model.parameters()).device
        stats = {e: torch.zeros(3, dtype=torch.float64) for e in layers}   # ce sum, correct, agree
        total = 0
        batches = range(0, sequences.shape[0], batch_size)
        if progress:
            batches = tqdm(batches, desc="analyzing", unit="batch")
        for s in batches:
            seq = sequences[s:s + batch_size].to(dev)
            x, y = seq[:, :-1], seq[:, 1:].reshape(-1)
            hs = layer_outputs(model, x)
            H = hs[L].shape[-1]
            flat = {e: hs[e].reshape(-1, H) for e in set(layers) | {L}}
            N = y.shape[0]
            for c in range(0, N, chunk):
                yc = y[c:c + chunk]
                final_pred = head(flat[L][c:c + chunk]).argmax(-1)
                for e in layers:
                    logits = head(flat[e][c:c + chunk]).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    ce = (lse - logits.gather(1, yc.view(-1, 1)).view(-1)).sum()
                    pred = logits.argmax(-1)
                    stats[e] += torch.stack([ce.double().cpu(), (pred == yc).sum().double().cpu(),
                                             (pred == final_pred).sum().double().cpu()])
            total += N
        out = []
        for e in layers:
            ce, correct, agree = stats[e].tolist()
            loss = ce / total
            out.append(LayerMetrics(e, correct / total, math.exp(min(loss, 700.0)), loss, agree / total, total))
        return out
    finally:
        model.train(was_training)


def format_table(metrics: list[LayerMetrics], title: Optional[str] = None) -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'layer':>5}  {'accuracy':>8}  {'perplexity':>11}  {'agreement':>9}")
    for m in metrics:
        lines.append(f"{m.layer:>5}  {m.accuracy:>8.4f}  {m.perplexity:>11.2f}  {m.agreement:>9.4f}")
    if metrics:
        lines.append(f"({metrics[0].tokens} tokens; agreement = top-1 equal to the last layer's)")
    return "\n".join(lines)


def plot_metrics(metrics: list[LayerMetrics], path: str, title: Optional[str] = None) -> Optional[str]:
    """Write a PNG (accuracy and agreement, perplexity on a log axis, by layer). Returns None on success or a
    one-line reason why no plot was written (matplotlib is the optional extra ``[plot]``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'layerskip_ext[plot]'); skipped the plot"
    xs = [m.layer for m in metrics]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(xs, [m.accuracy for m in metrics], "o-", label="next-token accuracy")
    a1.plot(xs, [m.agreement for m in metrics], "s--", label="agreement with last layer")
    a1.set_xlabel("exit layer")
    a1.set_ylim(0, 1)
    a1.grid(alpha=0.3)
    a1.legend()
    ppl = [m.perplexity for m in metrics]
    a2.plot(xs, ppl, "o-", color="tab:red")
    if min(ppl) > 0 and max(ppl) / min(ppl) > 10:
        a2.set_yscale("log")
    a2.set_xlabel("exit layer")
    a2.set_ylabel("perplexity")
    a2.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
