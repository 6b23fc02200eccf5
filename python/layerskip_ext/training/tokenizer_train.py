"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on a corpus, wrapped as ``io.Tokenizer``.

Byte-level BPE never produces unknown tokens (any text, code included, round-trips), and ``io.Tokenizer``
wraps a ``tokenizers.Tokenizer`` directly, so ``save_hf_folder`` writes a tokenizer.json that
``Tokenizer.from_hf_folder`` (and transformers) load back. Special tokens: ``<|endoftext|>`` (id 0; end of
document, used as EOS; no BOS is added).
"""
from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import TrainingError
from ..io import Tokenizer

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|pad|>"]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(docs: list[str], vocab_size: int, max_chars: int = 50_000_000):
    """-> io.Tokenizer trained on (at most ``max_chars`` of) ``docs``."""


    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise TrainingError(f"--train-tokenizer vocabulary size must be an integer >= {MIN_VOCAB} "
                            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    sample, total = [], 0
    for d in docs:
        sample.append(d)
        total += len(d)
        if total >= max_chars:
            break
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    eos = tok.token_to_id(EOS_TOKEN)
    return Tokenizer(tok, bos_token_id=None, eos_token_ids=[eos], eos_token_id=eos, add_bos_token=False)
