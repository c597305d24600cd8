"""Tokenizers rebuilt from GGUF metadata encode and decode exactly like the HF tokenizer they came from."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFWriter
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from deltaserve import LLM, SamplingParams
from deltaserve.tokenizer import load_tokenizer
from deltaserve.weights.gguf_export import export_gguf
from deltaserve.weights.gguf_vocab import QWEN_SPLITS, tokenizer_from_gguf, write_vocab
from deltaserve.weights.loader import load_model
from deltaserve.weights.safetensors_dir import CheckpointError
from tiny_models import save_hf_model

CORPUS = ["def add(x, y):\n    return x + y\n", "Hello world! Héllo wörld, naïve café.", "The year 2026 has 365 days.",
          "我想在苹果工作 1314 天", "don't won't I'll WE'VE", "tabs\tand  spaces   and\n\nnewlines",
          "emoji 🦙🚀 ok"] * 20
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLES = ["<|im_start|>user\nHéllo wörld, what's 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
           "  leading spaces,\ttabs and\r\nCRLF\n\n\n", "unicode: 我想在apple工作1314151天～ 🦙 e\u0301 (decomposed é)",
           "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it", "<|endoftext|><|im_end|>x"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def train(pre: str) -> Tokenizer:
    """A tiny byte-level BPE with the given pre-tokenizer ('gpt-2', 'qwen2' or 'qwen35')."""
    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def assert_same(hf: Tokenizer, ours) -> None:
    for text in SAMPLES:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny qwen3_5 checkpoint with a qwen2-style tokenizer, eos <|im_end|> and a chat template, and its GGUF."""
    path = save_hf_model("qwen3_5", tmp_path_factory.mktemp("chat"), vocab_size=320)
    tok = train("qwen2")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return path, tok, export_gguf(path, path / "chat.gguf", "f32")


def test_gguf_tokenizer_matches_hf(chat_model):
    path, hf, gguf = chat_model
    ours = load_tokenizer(gguf)
    assert_same(hf, ours)
    assert ours.chat_template == TEMPLATE
    assert load_model(gguf)[1].eos_token_ids == (hf.token_to_id("<|im_end|>"),)


def test_text_prompt_on_a_gguf_alone(chat_model):
    path, _, gguf = chat_model
    greedy = SamplingParams(max_tokens=6, temperature=0)
    ours = LLM(gguf, dtype="float32", max_num_seqs=1, max_model_len=64).generate("Hello wörld", greedy)[0]
    ref = LLM(path, dtype="float32", max_num_seqs=1, max_model_len=64).generate("Hello wörld", greedy)[0]
    assert ours.token_ids == ref.token_ids and ours.text == ref.text


@pytest.mark.parametrize("pre", ["gpt-2", "qwen35"])
def test_other_pretokenizers(pre, tmp_path):
    hf = train(pre)
    hf.save(str(tmp_path / "tokenizer.json"))
    writer = GGUFWriter(tmp_path / "vocab.gguf", "qwen35")  # vocab only, like the converter's --vocab-only
    assert write_vocab(writer, tmp_path, 300)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same(hf, tokenizer_from_gguf(tmp_path / "vocab.gguf"))


def test_unknown_pretokenizers_fail_by_name(tmp_path):
    hf = train("gpt-2")
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="Whitespace.*none of gpt-2, qwen2, qwen35"):
        write_vocab(GGUFWriter(None, "qwen35"), tmp_path, 300)
    writer = GGUFWriter(tmp_path / "llama3.gguf", "qwen35")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="pre-tokenizer 'llama-bpe' is not supported"):
        tokenizer_from_gguf(tmp_path / "llama3.gguf")
