"""Byte-level BPE tokenizers between `tokenizer.json` and GGUF metadata (`tokenizer.ggml.*`).

GGUF keeps tokens, token types, merges, special ids, the chat template and a pre-tokenizer *name*
(`tokenizer.ggml.pre`); the split regex behind each name is fixed (llama.cpp's llama-vocab.cpp, copied
from the models' tokenizer.json). Only the names below are known; anything else fails by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ..tokenizer import Tokenizer
from .gguf_file import GGUFFile
from .safetensors_dir import CheckpointError

QWEN_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
PRE_NAMES = ("gpt-2", *QWEN_SPLITS)


# --- GGUF -> tokenizers ------------------------------------------------------------------------------

def _pre_tokenizer(tok: HFTokenizer, pre: str) -> None:
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return
    tok.normalizer = normalizers.NFC()  # Qwen tokenizer.json files normalise to NFC before splitting
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])


def tokenizer_from_gguf(path: str | Path | GGUFFile) -> Tokenizer | None:
    """The GGUF file's tokenizer (with its chat template), or None if it carries no vocabulary."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    model = f.get("tokenizer.ggml.model", str, None)
    if model is None:
        return None
    pre = f.get("tokenizer.ggml.pre", str, "gpt-2")
    if model != "gpt2" or pre not in PRE_NAMES:
        raise CheckpointError(f"{f.path}: tokenizer '{model}' with pre-tokenizer '{pre}' is not supported; deltaserve "
                              f"builds 'gpt2' (byte-level BPE) tokenizers with pre-tokenizer {', '.join(PRE_NAMES)}")
    tokens = f.get("tokenizer.ggml.tokens", list)
    types = f.get("tokenizer.ggml.token_type", list, [TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"{f.path}: {len(tokens)} tokens but {len(types)} token types")
    merges = [m.split(" ") for m in f.get("tokenizer.ggml.merges", list)]
    if bad := next((" ".join(m) for m in merges if len(m) != 2), None):
        raise CheckpointError(f"{f.path}: merge {bad!r} in 'tokenizer.ggml.merges' is not two tokens")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != TokenType.UNUSED}
    try:
        tok = HFTokenizer(BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    except Exception as e:  # tokenizers raises its own exception type for merges of unknown tokens
        raise CheckpointError(f"{f.path}: inconsistent tokenizer.ggml tokens / merges ({e})") from None
    _pre_tokenizer(tok, pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED])
    return Tokenizer(tok, chat_template=f.get("tokenizer.chat_template", str, None))


# --- tokenizer.json -> GGUF (exporter) -----------------------------------------------------------------

def _pre_name(spec: dict[str, Any] | None) -> str:
    """Which known pre-tokenizer a tokenizer.json `pre_tokenizer` entry is."""
    kind = (spec or {}).get("type")
    if kind == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if kind == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, split in QWEN_SPLITS.items():
            if pattern == split:
                return name
    raise ValueError(f"tokenizer.json pre-tokenizer {json.dumps(spec)[:200]} is none of {', '.join(PRE_NAMES)} "
                     f"(a GGUF records only the name)")


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def write_vocab(w: GGUFWriter, hf_dir: Path, vocab_size: int) -> bool:
    """Adds the tokenizer.ggml.* keys and chat template as llama.cpp's converter does; False if no tokenizer.json."""
    tok_file = hf_dir / "tokenizer.json"
    if not tok_file.is_file():
        return False
    spec = json.loads(tok_file.read_text())
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{tok_file}: only byte-level BPE tokenizers convert to GGUF")
    pre = _pre_name(spec.get("pre_tokenizer"))
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC" if pre in QWEN_SPLITS else None):  # what the reader rebuilds for `pre`
        raise ValueError(f"{tok_file}: normalizer {normalizer} cannot be recorded in GGUF with pre-tokenizer '{pre}'")
    tok = HFTokenizer.from_file(str(tok_file))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    if max(by_id) >= vocab_size:
        raise ValueError(f"{tok_file}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer lacks become unused padding, as in the converter
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        special = i in added and (added[i].special or (t.startswith("<|") and t.endswith("|>")))
        types.append(TokenType.UNUSED if t is None else TokenType.CONTROL if special
                     else TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    cfg_file = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    model_file = hf_dir / "config.json"
    model_cfg = json.loads(model_file.read_text()) if model_file.is_file() else {}
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        text = _token_text(tcfg.get(f"{key}_token"))
        fallback = model_cfg.get(f"{key}_token_id")
        tid = tok.token_to_id(text) if text else fallback[0] if isinstance(fallback, list) else fallback
        if tid is not None:
            add(tid)
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    jinja = hf_dir / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tcfg.get("chat_template")
    if template:
        w.add_chat_template(template)
    return True
