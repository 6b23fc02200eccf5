"""Draft vocabulary: building, storing, loading, and lossless self-speculative greedy decoding with it."""
import json
import os

import numpy as np
import pytest
import torch

from layerskip_ext import ops
from layerskip_ext.cli import main
from layerskip_ext.errors import GenerationError, LayerSkipError
from layerskip_ext.generation import generate
from layerskip_ext.model import load_model
from layerskip_ext.model.draft_vocab import (DraftVocabError, count_tokens, default_draft_vocab_path,
                                             load_draft_vocab, save_draft_vocab, select_draft_vocab,
                                             special_token_ids, stored_draft_vocab_path)
from helpers import decoders, make_model
from tiny_checkpoints import CORPUS, make_random_state_dict, make_tiny_config, make_tiny_tokenizer, write_gguf, \
    write_hf_folder


def test_select_keeps_specials_then_most_frequent_ascending():
    counts = np.array([0, 0, 0, 5, 9, 9, 1, 7, 0, 3])
    ids = select_draft_vocab(counts, 5, always=[0, 2])
    # 0 and 2 forced; then 4 and 5 (9 each, lower id first), then 7 (7)
    assert ids.tolist() == [0, 2, 4, 5, 7]
    assert select_draft_vocab(counts, 10).tolist() == list(range(10))
    with pytest.raises(DraftVocabError, match="special tokens"):
        select_draft_vocab(counts, 1, always=[0, 1])
    with pytest.raises(DraftVocabError, match="size"):
        select_draft_vocab(counts, 11)
    with pytest.raises(DraftVocabError, match="outside"):
        count_tokens(np.array([1, 10]), 10)


def test_save_load_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "dv.json")
    save_draft_vocab(path, [7, 3, 3, 5], 10, corpus="x")
    assert load_draft_vocab(path, 10).tolist() == [3, 5, 7]  # sorted, duplicates dropped
    with pytest.raises(DraftVocabError, match="vocabulary of 10"):
        load_draft_vocab(path, 20)
    with pytest.raises(DraftVocabError, match="token ids must be in"):
        save_draft_vocab(path, [1, 10], 10)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"token_ids": [1, 2]}))
    with pytest.raises(DraftVocabError, match="not a draft vocabulary"):
        load_draft_vocab(str(bad), 10)
    bad.write_text("{")
    with pytest.raises(DraftVocabError, match="not valid JSON"):
        load_draft_vocab(str(bad), 10)
    with pytest.raises(DraftVocabError, match="cannot read"):
        load_draft_vocab(str(tmp_path / "missing.json"), 10)


@pytest.mark.parametrize("op_set", list(decoders()))
def test_head_argmax_over_subset_is_the_argmax_of_those_logits(op_set):
    model = make_model(op_set)
    h = torch.randn(5, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    subset = torch.tensor([0, 2, 17, 40, 41, 100, 250, model.config.vocab_size - 1])
    logits = model.head(h)
    expected = subset[logits[..., subset].argmax(-1)]
    assert torch.equal(model.decoder.head_argmax(h, subset), expected)
    assert torch.equal(model.decoder.head_argmax(h), logits.argmax(-1))


@pytest.mark.parametrize("op_set", list(decoders()))
def test_greedy_with_draft_vocab_equals_autoregressive(op_set):
    """Lossless whatever the subset, including one that excludes tokens the full model picks (the draft can then
    never propose them; the verifier emits them as corrections)."""
    model = make_model(op_set)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 9)]
    kw = dict(max_new_tokens=16, stop_token_ids=[])
    for prompt in prompts:
        expected = generate(model, prompt, **kw).sequences[0].tokens
        picked = sorted(set(expected))
        without_picked = [t for t in range(V) if t not in picked][: V // 2]
        subsets = {"excludes the model's picks": without_picked, "only the model's picks": picked,
                   "one token": [picked[0]], "random half": torch.randperm(V, generator=g)[: V // 2].tolist()}
        for name, subset in subsets.items():
            for E, d in ((1, 3), (2, 1), (3, 4), (4, 2)):
                r = generate(model, prompt, strategy="self_speculative", exit_layer=E, num_speculations=d,
                             draft_vocab=subset, **kw)
                assert r.sequences[0].tokens == expected, (name, E, d)
                if name == "excludes the model's picks":
                    assert r.stats["accepted_tokens"] == 0  # no draft can match a token it cannot propose


def test_draft_vocab_restricts_what_the_draft_proposes():
    """With E = L the draft is the full model: over the whole vocabulary every draft is accepted; over a subset
    holding only some of the model's choices, exactly the drafts outside it are rejected."""
    model = make_model("rowwise")
    prompt = [5, 6, 7, 8]
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="self_speculative", exit_layer=model.num_layers,
              num_speculations=3)
    full = generate(model, prompt, draft_vocab=None, **kw)
    assert full.stats["accepted_tokens"] == full.stats["draft_tokens"]
    tokens = full.sequences[0].tokens
    sub = generate(model, prompt, draft_vocab=sorted(set(tokens))[1:], **kw)
    assert sub.sequences[0].tokens == tokens
    assert sub.stats["accepted_tokens"] < sub.stats["draft_tokens"]


def test_model_draft_vocab_is_the_default_and_none_disables_it():
    model = make_model("rowwise")
    prompt = [5, 6, 7, 8]
    kw = dict(max_new_tokens=12, stop_token_ids=[], strategy="self_speculative", exit_layer=model.num_layers,
              num_speculations=3)
    tokens = generate(model, prompt, **kw).sequences[0].tokens
    model.draft_vocab = torch.tensor(sorted(set(tokens))[1:])
    assert generate(model, prompt, **kw).stats["accepted_tokens"] < generate(model, prompt, draft_vocab=None,
                                                                              **kw).stats["accepted_tokens"]


def test_sampling_ignores_the_draft_vocab():
    model = make_model("rowwise")
    kw = dict(max_new_tokens=10, stop_token_ids=[], strategy="self_speculative", exit_layer=2, num_speculations=3,
              temperature=0.8, seed=3)
    a = generate(model, [5, 6, 7], draft_vocab=None, **kw)
    b = generate(model, [5, 6, 7], draft_vocab=[4, 9], **kw)
    assert a.sequences[0].tokens == b.sequences[0].tokens and a.stats == b.stats


@pytest.mark.parametrize("bad, message", [([], "non-empty"), ([[1, 2]], "1-D"), ([-1], "must be in"),
                                          ([10_000], "must be in"), ("all", "draft_vocab must be")])
def test_bad_draft_vocab_argument(bad, message):
    model = make_model("rowwise")
    with pytest.raises(GenerationError, match=message):
        generate(model, [1, 2], strategy="self_speculative", exit_layer=1, num_speculations=2, draft_vocab=bad)


# ---------------------------------------------------------------------------------------------------------------
# Stored with the model: the command writes it, load_model finds it
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dv")
    config = make_tiny_config(num_hidden_layers=3, max_position_embeddings=64)
    sd = make_random_state_dict(config, seed=3)
    tok = make_tiny_tokenizer()
    write_hf_folder(root / "hf", config, sd, tok)
    write_gguf(root / "m.gguf", config, sd, tok, tensor_type="F32")
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, text in enumerate(CORPUS):
        (corpus / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text)
    return {"hf": str(root / "hf"), "gguf": str(root / "m.gguf"), "corpus": str(corpus), "root": root}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_command_stores_it_with_the_model_and_load_model_finds_it(checkpoints, capsys, fmt):
    model_path = checkpoints[fmt]
    code, out, _ = run_cli(capsys, "draft-vocab", "--model", model_path, "--data", checkpoints["corpus"], "--size",
                           "40", "--json")
    assert code == 0
    summary = json.loads(out)
    where = default_draft_vocab_path(model_path)
    assert summary["out"] == where and os.path.isfile(where) and stored_draft_vocab_path(model_path) == where
    if fmt == "hf":
        assert where == os.path.join(model_path, "draft_vocab.json")
    else:
        assert where.endswith("m.draft_vocab.json") and os.path.dirname(where) == os.path.dirname(model_path)
    assert summary["size"] == 40 and 0 < summary["coverage"] <= 1
    ids = load_draft_vocab(where)
    tok = make_tiny_tokenizer()
    assert set(special_token_ids(tok)) <= set(ids.tolist())  # EOS / BOS / specials always in
    # the most frequent token of the corpus is in
    stream = [t for text in CORPUS for t in tok.encode(text)]
    assert max(set(stream), key=stream.count) in ids.tolist()

    model, _ = load_model(model_path, backend="reference")
    assert torch.equal(model.draft_vocab, ids)
    model, _ = load_model(model_path, backend="reference", draft_vocab=None)
    assert model.draft_vocab is None
    model, _ = load_model(model_path, backend="reference", draft_vocab="none")
    assert model.draft_vocab is None
    os.remove(where)
    model, _ = load_model(model_path, backend="reference")
    assert model.draft_vocab is None


def test_generate_command_with_a_draft_vocab_file(checkpoints, capsys):
    out_file = str(checkpoints["root"] / "custom.json")
    code, _, err = run_cli(capsys, "draft-vocab", "--model", checkpoints["hf"], "--data", checkpoints["corpus"],
                           "--size", "30", "--out", out_file)
    assert code == 0 and "wrote" in err and os.path.isfile(out_file)
    common = ["generate", "--model", checkpoints["hf"], "--prompt", "def add(a, b):", "--max-new-tokens", "10",
              "--json", "--strategy", "self_speculative", "--exit-layer", "1", "--num-speculations", "3"]
    if not ops.native_available():
        common += ["--backend", "reference"]
    runs = {}
    for choice in (out_file, "none"):
        code, out, _ = run_cli(capsys, *common, "--draft-vocab", choice)
        assert code == 0
        runs[choice] = json.loads(out)
    assert runs[out_file]["tokens"] == runs["none"]["tokens"]
    code, _, err = run_cli(capsys, *common, "--draft-vocab", str(checkpoints["root"] / "missing.json"))
    assert code == 2 and "cannot read draft vocabulary" in err


def test_command_errors(checkpoints, capsys):
    code, _, err = run_cli(capsys, "draft-vocab", "--model", checkpoints["hf"], "--data",
                           str(checkpoints["root"] / "nope"), "--out", str(checkpoints["root"] / "x.json"))
    assert code == 2 and "not found" in err
    code, _, err = run_cli(capsys, "draft-vocab", "--model", checkpoints["hf"], "--data", checkpoints["corpus"],
                           "--size", "0", "--out", str(checkpoints["root"] / "x.json"))
    assert code == 2 and "--size" in err
    code, _, err = run_cli(capsys, "draft-vocab", "--model", checkpoints["hf"], "--data", checkpoints["corpus"],
                           "--size", "1", "--out", str(checkpoints["root"] / "x.json"))
    assert code == 2 and "special tokens" in err


def test_draft_vocab_error_is_a_layerskip_error():
    assert issubclass(DraftVocabError, LayerSkipError)
