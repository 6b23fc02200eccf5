"""``generate``: one entry point for every decoding strategy."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .. import ops
from ..errors import GenerationError
from ..model.draft_vocab import DraftVocabError, check_draft_vocab
from .autoregressive import generate_autoregressive
from .batch import DecodeBatch
from .core import GenerationResult, SequenceOutput, StopRules, TokenCallback, check_prompts
from .defaults import resolve_strategy
from .draft_stop import as_stop_model, tuned_stop_model
from .sampling import SamplingParams
from .self_speculative import generate_self_speculative

STRATEGIES = ("auto", "autoregressive", "early_exit", "self_speculative")


def generate(model, prompts: list[list[int]] | list[int], *, strategy: str = "auto",
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, stop_token_ids: Optional[Iterable[int]] = None,
             exit_layer: Optional[int] = None, num_speculations: Optional[int] = None,
             on_token: Optional[TokenCallback] = None, draft_vocab="auto",
             cuda_graph: bool = False, draft_stop: Optional[float] = None,
             draft_growth: Optional[int] = None, draft_stop_model="auto") -> GenerationResult:
    """Generate continuations of token-id prompts (one list, or a batch of lists of any lengths).

    strategy: "autoregressive" (all layers, one token per pass), "early_exit" (layers < exit_layer, then the
    shared head: lossy), "self_speculative" (draft num_speculations tokens with layers < exit_layer, verify
    with the rest: output as the full model's; the model's tuned setting fills what is not given), or "auto"
    (the default: self_speculative with the model's tuned (E, d) when it has one that pays, when sampling its tuned
    sampling setting, see generation/defaults.py, else autoregressive). Stops at any of ``stop_token_ids``
    (default: the model config's EOS ids), after ``max_new_tokens``, or when a sequence reaches the model's context
    length (finish_reason "context_full").

    draft_vocab (self_speculative, greedy only): the token ids the draft's exit head scores: "auto" (default) the
    model's stored draft vocabulary (``model.draft_vocab``, set by load_model) if it has one, None for the whole
    vocabulary, or a sequence / 1-D tensor of ids. Output is the same either way (verification scores the full
    vocabulary); only acceptance and speed change. Sampling drafts ignore it.

    cuda_graph (model on a CUDA device; greedy or sampling): replay each full-length self-speculative round, or
    each autoregressive / early-exit step, as a CUDA graph (generation/cuda_graph.py). Same output (sampling: the
    same draws for the same seed, the generator registered with the graphs); fewer launches and no Python between
    them.

    draft_stop (self_speculative): dynamic drafting: a round drafts up to num_speculations tokens, stopping
    where the exit head's top probability falls below draft_stop (None: the model's tuned setting, for sampling its
    sampling setting's (generation/defaults.tuned_block), else 0 = off; in a batch, where the rows' mean chance does:
    each row proposes its drafts while the round runs; sampling: the top probability of the draft's own
    distribution, at the sampling temperature). Same output (in distribution, when sampling); it saves the drafts
    (and their verification) that would likely be rejected.

    draft_growth (self_speculative, greedy or sampling): dynamic drafting: a round's length adapts, starting at
    draft_growth, growing by it after a round whose drafts were all accepted (up to num_speculations) and falling to
    one more than the accepted run after a rejection (generation/draft_length.py; None: the model's tuned setting,
    else 0 = every round drafts num_speculations). Same output (in distribution, when sampling).

    draft_stop_model (with draft_stop > 0): the draft stops where a fitted model's chance that the round's whole
    run is accepted falls below draft_stop, instead of the top probability (generation/draft_stop.py): six weights,
    None (off), or "auto" (default: the model's tuned one, when draft_stop is the tuned setting too). Same output.
    """
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # a single prompt
    prompts = [list(map(int, p)) for p in prompts]
    config = model.config
    decoder = model.decoder
    decoder.check_current(model)
    check_prompts(prompts, config.vocab_size, config.max_position_embeddings)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    asked_stop = draft_stop
    strategy, exit_layer, num_speculations, draft_stop, draft_growth = resolve_strategy(
        model, strategy, exit_layer, num_speculations, draft_stop, draft_growth, greedy=sampling.greedy)
    if isinstance(draft_stop_model, str):
        if draft_stop_model != "auto":
            raise GenerationError(f"draft_stop_model must be 'auto', None or {ops.STOP_MODEL_SIZE} weights, got "
                                  f"{draft_stop_model!r}")
        tuned = asked_stop is None and draft_stop and sampling.greedy  # (the stored stop model is greedy's)
        draft_stop_model = tuned_stop_model(model, exit_layer) if tuned else None
    stop_model = as_stop_model(draft_stop_model)
    if strategy == "autoregressive" and exit_layer not in (None, model.num_layers):
        raise GenerationError("exit_layer applies to the early_exit and self_speculative strategies")
    if strategy != "autoregressive":
        exit_layer = check_exit_layer(exit_layer, model.num_layers)
    if strategy == "self_speculative":
        if not isinstance(num_speculations, int) or num_speculations < 1:
            raise GenerationError(f"num_speculations must be an integer >= 1, got {num_speculations!r}")
        room = config.max_position_embeddings - max(len(p) for p in prompts)
        if num_speculations >= room:
            raise GenerationError(f"num_speculations={num_speculations} does not fit the remaining context: the "
                                  f"longest prompt leaves {room} of {config.max_position_embeddings} positions")

    if not (isinstance(draft_stop, (int, float)) and 0.0 <= draft_stop <= 1.0):
        raise GenerationError(f"draft_stop must be a probability in [0, 1], got {draft_stop!r}")
    if draft_stop and strategy != "self_speculative":
        raise GenerationError("draft_stop (dynamic drafting) applies to self_speculative decoding only")
    if stop_model is not None and not draft_stop:
        raise GenerationError("draft_stop_model needs draft_stop > 0: its threshold on the chance that a round's "
                              "drafts are all accepted")
    if stop_model is not None and not sampling.greedy:
        raise GenerationError("draft_stop_model applies to greedy decoding only (fitted on greedy drafts); "
                              "sampling takes a plain draft_stop")
    if not (isinstance(draft_growth, int) and not isinstance(draft_growth, bool) and draft_growth >= 0):
        raise GenerationError(f"draft_growth must be an integer >= 0, got {draft_growth!r}")
    if draft_growth and strategy != "self_speculative":
        raise GenerationError("draft_growth (dynamic drafting) applies to self_speculative decoding only")
    if cuda_graph:
        if draft_stop or draft_growth:
            raise GenerationError("cuda_graph replays fixed-length rounds: it does not combine with dynamic drafting "
                                  f"(draft_stop={draft_stop:g}, draft_growth={draft_growth}, the model's tuned "
                                  "setting where not given: pass 0 for both)")
        if model.device.type != "cuda":
            raise GenerationError(f"cuda_graph needs the model on a CUDA device; it is on {model.device}")
    subset = resolve_draft_vocab(model, draft_vocab) if strategy == "self_speculative" else None

    stops = config.eos_token_ids if stop_token_ids is None else list(stop_token_ids)
    capacity = min(max(len(p) for p in prompts) + max_new_tokens, config.max_position_embeddings)
    rules = StopRules([SequenceOutput(p) for p in prompts], max_new_tokens, stops, capacity, on_token)
    result = GenerationResult(rules.outputs, strategy)
    if max_new_tokens == 0:
        return result
    batch = DecodeBatch(decoder, rules, capacity)
    if strategy == "self_speculative":
        result = generate_self_speculative(decoder, batch, sampling, result, exit_layer, num_speculations, subset,
                                           cuda_graph, draft_stop, draft_growth, stop_model)
        result.stats.update(draft_stop=draft_stop, draft_growth=draft_growth,
                            draft_stop_model=None if stop_model is None else stop_model.tolist())
    else:
        result = generate_autoregressive(decoder, batch, sampling, result,
                                         exit_layer=exit_layer if strategy == "early_exit" else None,
                                         cuda_graph=cuda_graph)
        if strategy == "early_exit":
            result.stats["exit_layer"] = exit_layer
    ops.check_device_errors(model.device)  # what the CUDA kernels could only flag (a no-op on the CPU)
    return result


def resolve_draft_vocab(model, draft_vocab) -> Optional[torch.Tensor]:
    """generate's draft_vocab argument -> ascending int64 ids on the model's device, or None (all tokens)."""
    if isinstance(draft_vocab, str):
        if draft_vocab != "auto":
            raise GenerationError(f"draft_vocab must be 'auto', None, or token ids; got {draft_vocab!r}")
        draft_vocab = getattr(model, "draft_vocab", None)
    if draft_vocab is None:
        return None
    try:
        ids = check_draft_vocab(draft_vocab, model.config.vocab_size)
    except DraftVocabError as e:
        raise GenerationError(str(e)) from None
    return ids.to(model.device)


def check_exit_layer(exit_layer: Optional[int], num_layers: int) -> int:
    if exit_layer is None:
        raise GenerationError("the early_exit and self_speculative strategies need exit_layer")
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= num_layers:
        raise GenerationError(f"exit_layer must be an integer in [1, {num_layers}], got {exit_layer!r}")
    return exit_layer
