"""The data recipe of the default model: CPython standard-library sources, a byte-level BPE, token windows.

Recipe (deterministic for a given Python installation; the shipped model used CPython 3.11.7):
  - every `*.py` under `sysconfig.get_paths()["stdlib"]`, sorted by relative path, except
    site-packages, test directories (`test/`, `tests/`, `idle_test/`), `encodings/` (generated
    codec tables), `pydoc_data/` (one 750 kB text blob), `config-*/` and `_sysconfigdata_*`
    (build-machine specific);
  - held out: files whose sha1(relative path) is 0 mod 25 (about 4%), never seen in training;
  - each file's text followed by <|endoftext|>, all training files concatenated into one stream;
  - training windows: random offsets into that stream, drawn from a seeded generator.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}
HELD_OUT_MODULUS = 25


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def source_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the recipe, each sorted by path relative to `root`."""
    root = root or stdlib_root()
    train, held = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata_"):
            continue
        (held if is_held_out(rel.as_posix()) else train).append(path)
    return train, held


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) over the training files only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    return tok


def token_stream(tok: Tokenizer, files: list[Path]) -> torch.Tensor:
    """All files' tokens, each file followed by <|endoftext|>: [N] int64."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([read_text(p) for p in files], add_special_tokens=False):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` windows of `length` consecutive tokens at random offsets: [B, length]."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=gen)
    return torch.stack([stream[s: s + length] for s in starts.tolist()])
