"""Text <-> token ids through the checkpoint's `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path: str | Path):
        self._tok = _HFTokenizer.from_file(str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        file = Path(path) / "tokenizer.json"
        return cls(file) if file.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
