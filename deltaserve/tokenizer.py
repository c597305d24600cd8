"""Text <-> token ids through the checkpoint's `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, source: str | Path | _HFTokenizer, chat_template: str | None = None):
        """source: a tokenizer.json path or a built `tokenizers.Tokenizer`; chat_template: jinja source, if known."""
        self._tok = source if isinstance(source, _HFTokenizer) else _HFTokenizer.from_file(str(source))
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        file = Path(path) / "tokenizer.json"
        return cls(file) if file.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory (tokenizer.json) or of a .gguf file (its tokenizer.ggml.* metadata)."""
    if str(path).endswith(".gguf"):
        from .weights.gguf_vocab import tokenizer_from_gguf
        return tokenizer_from_gguf(path)
    return Tokenizer.from_dir(path)
