"""``layerskip analyze``: per-layer next-token accuracy, perplexity and agreement with the last layer on a corpus."""
from __future__ import annotations

import argparse
import json
import sys

from ..analysis import format_table, per_layer_metrics, plot_metrics
from ..corpus import read_corpus, tokenize_corpus
from ..errors import TrainingError
from ..model import load_model
from ..training.data import evaluation_sequences
from .common import add_runtime_args, layer_list, setup_threads, str_list

NAME = "analyze"
HELP = "per-layer next-token accuracy, perplexity, agreement with the last layer"


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Per-layer early-exit quality of a model on a corpus: next-token accuracy, perplexity and "
                     "top-1 agreement with the last layer, as a table and a PNG plot.")
    p.add_argument("--model", required=True, help="HF folder, .gguf file, or a packaged name")
    p.add_argument("--data", required=True, help="corpus: a folder of text/code files, a .jsonl, or a text file")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32768, help="evaluate about this many tokens, spread evenly "
                                                                  "over the corpus (default 32768)")
    p.add_argument("--max-data-mb", type=float, default=None, help="read at most this many MB of text")
    p.add_argument("--exclude", type=str_list, default=None, metavar="PATH1,PATH2",
                   help="paths inside a folder --data to leave out")
    p.add_argument("--layers", type=layer_list, default=None, help="1-based layers to report (default all)")
    p.add_argument("--plot", default="layerskip_analyze.png", help="PNG path (default layerskip_analyze.png)")
    p.add_argument("--no-plot", action="store_true")
    add_runtime_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args) -> int:
    for name in ("seq_len", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    setup_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, backend=args.backend, device=args.device)
    if tokenizer is None:
        raise TrainingError(f"{args.model} has no tokenizer; analysis needs one to read the corpus")
    if args.seq_len > model.config.max_position_embeddings:
        raise TrainingError(f"--seq-len {args.seq_len} exceeds the model's context "
                            f"({model.config.max_position_embeddings})")
    max_bytes = None if args.max_data_mb is None else int(args.max_data_mb * 1e6)
    docs = read_corpus(args.data, args.text_field, max_bytes, args.exclude)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (model.config.eos_token_ids or [None])[0]
    stream = tokenize_corpus(docs, tokenizer, eos)
    seqs = evaluation_sequences(stream, args.seq_len, max(1, args.max_tokens // args.seq_len))
    metrics = per_layer_metrics(model, seqs, batch_size=args.batch_size, layers=args.layers,
                                progress=not args.json)
    title = f"{args.model} on {args.data}"
    note = None
    if not args.no_plot:
        note = plot_metrics(metrics, args.plot, title)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "tokens": metrics[0].tokens,
                          "layers": [m.__dict__ for m in metrics],
                          "plot": None if (args.no_plot or note) else args.plot, "plot_note": note}))
    else:
        print(format_table(metrics, title))
        if not args.no_plot:
            print(note if note else f"plot: {args.plot}", file=sys.stderr if note else sys.stdout)
    return 0
