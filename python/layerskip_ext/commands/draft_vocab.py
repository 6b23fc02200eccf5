"""``layerskip draft-vocab``: count a corpus's tokens with the model's tokenizer and store the draft vocabulary
(the N most frequent tokens plus the special ones) with the model, where load_model finds it."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import LayerSkipError
from ..io import load_checkpoint
from ..model.draft_vocab import build_draft_vocab, default_draft_vocab_path, save_draft_vocab

NAME = "draft-vocab"
HELP = "store a frequency-ranked draft vocabulary with a model (cheaper self-speculative drafts, same output)"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, .gguf file, adapter folder, or a packaged name")
    p.add_argument("--data", required=True, help="corpus: a folder (every text file below it), JSONL or text file")
    p.add_argument("--size", type=int, default=8192, help="tokens to keep (special / EOS tokens always included)")
    p.add_argument("--out", default=None,
                   help="output file (default: stored with the model: <folder>/draft_vocab.json, "
                        "<file>.draft_vocab.json beside a GGUF, or the package's models/<name>/ for a packaged name)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most about this many bytes of text")
    p.add_argument("--exclude", default="", help="comma-separated paths inside a folder corpus to leave out")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args) -> int:
    if args.size < 1:
        raise LayerSkipError(f"--size must be >= 1, got {args.size}")
    # Only the tokenizer and config are needed, but every format stores them with the weights.
    ckpt = load_checkpoint(args.model)
    if ckpt.tokenizer is None:
        raise LayerSkipError(f"{args.model} has no tokenizer; a draft vocabulary counts its tokens")
    ids, meta = build_draft_vocab(args.data, ckpt.tokenizer, ckpt.config, min(args.size, ckpt.config.vocab_size),
                                  text_field=args.text_field, max_bytes=args.max_bytes,
                                  exclude=[e for e in args.exclude.split(",") if e.strip()])
    out = args.out or default_draft_vocab_path(args.model)
    save_draft_vocab(out, ids, ckpt.config.vocab_size, **meta)
    summary = dict(out=out, size=int(ids.numel()), vocab_size=ckpt.config.vocab_size,
                   corpus_tokens=meta["corpus_tokens"], coverage=meta["coverage"])
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out}: {summary['size']} of {summary['vocab_size']} tokens, covering "
              f"{100 * summary['coverage']:.2f}% of the corpus's {summary['corpus_tokens']} tokens", file=sys.stderr)
    return 0
