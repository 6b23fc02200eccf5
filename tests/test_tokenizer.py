"""Tokenizer: encode/decode, BOS defaults, GGUF/SentencePiece vocab conversion, chat templates, streaming."""
import io
import json
import warnings

import pytest

from layerskip_ext.errors import CheckpointError, GenerationError
from layerskip_ext.io import Tokenizer
from layerskip_ext.io.gguf_file import tokenizer_from_metadata
from layerskip_ext.io.vocab_build import build_spm_bpe, byte_level_pre_tokenizer
from tiny_checkpoints import CHATML_TEMPLATE, CORPUS, gguf_tokenizer_metadata, make_tiny_tokenizer

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading and trailing  ",
    "multiple   spaces\tand\ttabs\n\nnew lines\r\n",
    "digits 1234567890 and 3.14159, 2024-01-01",
    "unicode: héllo wörld, naïve café, 日本語テキスト, Ελληνικά, emoji 🙂👍🏽",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "I'm you're they'll we've she'd it's DON'T",
    "",
    " ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_tokenizer()


def _gguf_meta(tok, pre="smollm"):
    m = gguf_tokenizer_metadata(tok)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": m["tokens"],
            "tokenizer.ggml.token_type": m["types"], "tokenizer.ggml.merges": m["merges"],
            "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
            "tokenizer.ggml.add_bos_token": tok.add_bos_token}
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


# ---- basics -----------------------------------------------------------------------------------------------
def test_tiny_tokenizer_properties(tiny):
    assert tiny.vocab_size == 320
    assert tiny.bos_token_id == 1 and tiny.bos_token == "<|im_start|>"
    assert tiny.eos_token_ids == {2} and tiny.eos_token == "<|im_end|>"
    assert tiny.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tiny, text):
    ids = tiny.encode(text)
    assert all(0 <= i < tiny.vocab_size for i in ids)
    assert tiny.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_in_text_and_skip(tiny):
    ids = tiny.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny.decode(ids) == "user\nhi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_add_bos_semantics():
    no_bos = make_tiny_tokenizer(add_bos=False)
    with_bos = make_tiny_tokenizer(add_bos=True)
    plain = no_bos.encode("hello")
    assert plain[0] != 1
    assert with_bos.encode("hello") == [1] + plain          # model default
    assert with_bos.encode("hello", add_bos=False) == plain
    assert no_bos.encode("hello", add_bos=True) == [1] + plain
    assert with_bos.encode("<|im_start|>hello") == [1] + plain  # BOS is not doubled
    assert with_bos.encode("") == [1]
    assert no_bos.encode("") == []


def test_decode_accepts_tensors_and_numpy(tiny):
    import numpy as np
    import torch
    ids = tiny.encode("Hello world")
    assert tiny.decode(torch.tensor(ids)) == "Hello world"
    assert tiny.decode(np.array(ids)) == "Hello world"


def test_encode_rejects_non_str(tiny):
    with pytest.raises(GenerationError):
        tiny.encode(b"bytes")


# ---- GGUF byte-level BPE ------------------------------------------------------------------------------------
def test_gguf_byte_level_matches_original(tiny):
    tok = tokenizer_from_metadata(_gguf_meta(tiny))
    assert tok.vocab_size == tiny.vocab_size
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2} and tok.add_bos_token is False
    extra = ["x = 10000000 + 0.5e-3", "The year 1999.", "a\u00a0b\u2003c", "ÆØÅ æøå ß 漢字 𝔘𝔫𝔦"]
    for text in TEXTS + CORPUS + extra:
        assert tok.encode(text) == tiny.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_gguf_special_and_user_defined_tokens(tiny):
    meta = _gguf_meta(tiny)
    meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"])
    meta["tokenizer.ggml.token_type"][0] = 4  # <|endoftext|> as a user-defined (non-special) token
    tok = tokenizer_from_metadata(meta)
    ids = tok.encode("a<|endoftext|>b<|im_end|>")
    assert 0 in ids and 2 in ids
    assert tok.decode(ids) == "a<|endoftext|>b"  # control tokens are skipped, user-defined kept


def test_pre_tokenizer_families():
    def split(pre, text):
        return [p for p, _ in byte_level_pre_tokenizer(pre).pre_tokenize_str(text)]
    assert split("smollm", "ab 123") == ["ab", "Ġ", "1", "2", "3"]
    assert split("gpt2", "ab 123") == ["ab", "Ġ123"]
    assert split("llama-bpe", "ab 12345") == ["ab", "Ġ", "123", "45"]
    with pytest.warns(UserWarning, match="pre-type 'mystery'"):
        assert split("mystery", "ab 123") == ["ab", "Ġ123"]


def test_gguf_tokenizer_errors(tiny):
    meta = _gguf_meta(tiny)
    bad = dict(meta, **{"tokenizer.ggml.model": "t5"})
    with pytest.raises(CheckpointError, match="unsupported tokenizer model 't5'"):
        tokenizer_from_metadata(bad)
    bad = dict(meta)
    del bad["tokenizer.ggml.merges"]
    with pytest.raises(CheckpointError, match="merges"):
        tokenizer_from_metadata(bad)
    bad = dict(meta, **{"tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(CheckpointError, match="token_type"):
        tokenizer_from_metadata(bad)
    assert tokenizer_from_metadata({}) is None


# ---- SentencePiece ----------------------------------------------------------------------------------------------
def _train_spm(model_type: str) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_writer=buf, vocab_size=500 if model_type == "bpe" else 400,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, character_coverage=1.0, unk_id=0,
        bos_id=1, eos_id=2, minloglevel=2, hard_vocab_limit=model_type == "bpe")
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_model():
    import sentencepiece
    data = _train_spm("bpe")
    return data, sentencepiece.SentencePieceProcessor(model_proto=data)


def spm_vocab(sp):
    """(pieces, scores, GGUF token types) of a SentencePiece model, as a GGUF file stores them."""
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 1 for i in range(n)]
    return [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types


SPM_TEXTS = TEXTS[:-1] + CORPUS + ["zebra quixotic ÆØÅ 漢字", "a", " leading", "trailing "]


def test_spm_conversion_matches_sentencepiece(spm_model):
    """The GGUF path: a SentencePiece BPE vocabulary rebuilt as a tokenizers backend encodes as sentencepiece."""
    data, sp = spm_model
    pieces, scores, types = spm_vocab(sp)
    tok = Tokenizer(build_spm_bpe(pieces, scores, types), bos_token_id=1, eos_token_ids=[2], add_bos_token=True)
    for text in SPM_TEXTS:
        ref = sp.encode(text)
        assert tok.encode(text, add_bos=False) == ref, text
        assert tok.encode(text) == [1] + ref
        assert tok.decode(ref) == sp.decode(ref)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_spm_tokenizer_model_in_hf_folder(model_type, tmp_path):
    """A folder with only tokenizer.model (BPE or Unigram) tokenizes through sentencepiece itself."""
    import sentencepiece
    data = _train_spm(model_type)
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    (tmp_path / "tokenizer.model").write_bytes(data)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    tok = Tokenizer.from_hf_folder(str(tmp_path))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2} and tok.add_bos_token
    assert tok.vocab_size == sp.get_piece_size()
    for text in SPM_TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("<s>hi</s>", add_bos=False) == [1] + sp.encode("hi") + [2]  # control pieces in the text
    assert tok.decode([1] + sp.encode("hi") + [2]) == "hi"
    stream = tok.stream_decoder()
    ids = sp.encode(SPM_TEXTS[0])
    assert "".join(stream.push(i) for i in ids) + stream.flush() == sp.decode(ids)
    # it saves its tokenizer.model, which reloads identically
    out = tmp_path / "saved"
    tok.save(out)
    assert (out / "tokenizer.model").read_bytes() == data
    again = Tokenizer.from_hf_folder(str(out))
    for text in SPM_TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_corrupt_spm_model_is_a_clear_error(spm_model, tmp_path):
    data, _ = spm_model
    (tmp_path / "tokenizer.model").write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match="not a valid SentencePiece model"):
        Tokenizer.from_hf_folder(str(tmp_path))


def test_gguf_llama_spm_tokenizer(spm_model):
    data, sp = spm_model
    pieces, scores, types = spm_vocab(sp)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok = tokenizer_from_metadata(meta)
    assert tok.add_bos_token  # llama.cpp's default for SentencePiece vocabularies
    for text in SPM_TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


# ---- chat templates ------------------------------------------------------------------------------------------------
def test_chat_template_chatml(tiny):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = tiny.apply_chat_template(msgs)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.apply_chat_template(msgs, add_generation_prompt=False).endswith("Hi!<|im_end|>\n")


def test_chat_template_hf_semantics():
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
                "{% if loop.index > 5 %}{% break %}{% endif %}"
                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}"
                "{{ eos_token }}{% else %}[{{ m['content'] | tojson }}]{% endif %}\n{% endfor %}")
    tok = make_tiny_tokenizer(chat_template=template)
    out = tok.apply_chat_template([{"role": "user", "content": "é"}, {"role": "assistant", "content": " ok "}])
    assert out == '<|im_start|>["é"]ok<|im_end|>'  # trim_blocks eats the newline after a block tag
    with pytest.raises(GenerationError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(GenerationError):
        tok.apply_chat_template("not a list")


def test_chat_template_missing_or_broken():
    with pytest.raises(GenerationError, match="no chat template"):
        make_tiny_tokenizer(chat_template=None).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(GenerationError, match="invalid chat template"):
        make_tiny_tokenizer(chat_template="{% for %}").apply_chat_template([{"role": "user", "content": "x"}])


# ---- streaming -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["🙂🙂 日本 ok"])
def test_stream_decoder_matches_full_decode(tiny, text):
    ids = tiny.encode(text)
    sd = tiny.stream_decoder()
    pieces = [sd.push(i) for i in ids]
    pieces.append(sd.flush())
    assert "".join(pieces) == tiny.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_back_partial_utf8(tiny):
    ids = tiny.encode("🙂")
    assert len(ids) > 1  # the emoji is split into byte-level pieces in the tiny vocab
    sd = tiny.stream_decoder()
    outs = [sd.push(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "🙂"
    # an incomplete sequence comes out (as U+FFFD) only on flush
    sd = tiny.stream_decoder()
    assert sd.push(ids[0]) == ""
    assert sd.flush() == "\ufffd"
    assert sd.flush() == ""


def test_stream_decoder_spm_spaces(spm_model):
    data, sp = spm_model
    pieces, scores, types = spm_vocab(sp)
    tok = Tokenizer(build_spm_bpe(pieces, scores, types), bos_token_id=1, eos_token_ids=[2])
    for text in ["The capital of France is Paris.", "héllo 🙂 wörld  x", " lead"]:
        ids = [1] + sp.encode(text)
        sd = tok.stream_decoder()
        out = "".join(sd.push(i) for i in ids) + sd.flush()
        assert out == tok.decode(ids) == sp.decode(sp.encode(text))


# ---- save / load -----------------------------------------------------------------------------------------------
def test_save_and_reload(tmp_path):
    tok = make_tiny_tokenizer(add_bos=True)
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>" and cfg["add_bos_token"] is True
    assert cfg["chat_template"] == CHATML_TEMPLATE
    again = Tokenizer.from_hf_folder(str(tmp_path))
    assert (again.bos_token_id, again.eos_token_ids, again.add_bos_token, again.chat_template) == \
        (tok.bos_token_id, tok.eos_token_ids, True, tok.chat_template)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_hf_folder_defaults_from_post_processor_and_generation_config(tmp_path):
    from tokenizers import processors
    tok = make_tiny_tokenizer()
    tok.backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": "{{ 'D' }}"}, {"name": "tool_use", "template": "T"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    again = Tokenizer.from_hf_folder(str(tmp_path), {"eos_token_id": 2})
    assert again.add_bos_token is True       # from the post-processor
    assert again.eos_token_ids == {0, 2} and again.eos_token_id == 2
    assert again.apply_chat_template([]) == "D"
    (tmp_path / "chat_template.jinja").write_text("{{ 'J' }}")
    assert Tokenizer.from_hf_folder(str(tmp_path)).apply_chat_template([]) == "J"


def test_hf_folder_without_tokenizer(tmp_path):
    assert Tokenizer.from_hf_folder(str(tmp_path)) is None


def test_corrupt_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(str(tmp_path))
    make_tiny_tokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_hf_folder(str(tmp_path))


def test_transformers_reads_saved_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    for add_bos in (False, True):
        tok = make_tiny_tokenizer(add_bos=add_bos)
        out = tmp_path / f"bos{int(add_bos)}"
        tok.save(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoTokenizer.from_pretrained(str(out))
        for text in TEXTS:
            if add_bos and text.startswith("<|im_start|>"):
                continue  # deliberate difference: we do not double BOS, transformers does
            assert hf(text)["input_ids"] == tok.encode(text), (add_bos, text)
            assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))
        msgs = [{"role": "user", "content": "Hi"}]
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(msgs)
        assert hf.eos_token_id == 2 and hf.bos_token_id == 1
