"""End-to-end checks of the model shipped in deltaserve/models/default (trained by deltaserve.training).

The bounds separate a trained model from an untrained one by a wide margin: the untrained model
(same config, random init) greedily repeats one token and scores a perplexity near the vocabulary
size (~4000) on the snippet below, which is not from the training data.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltaserve
from deltaserve import LLM, SamplingParams
from deltaserve.training.evaluate import mtp_accuracy

DEFAULT_MODEL = Path(deltaserve.__file__).parent / "models" / "default"

SNIPPET = '''import os


def find_files(root, suffix=".py"):
    """Return the paths of all files under root that end with suffix."""
    result = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(suffix):
                result.append(os.path.join(dirpath, name))
    return sorted(result)


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
'''
PPL_BOUND = 40.0


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(DEFAULT_MODEL, dtype="float32", max_model_len=512, max_num_seqs=2)


def greedy(llm: LLM, prompt: str, n: int = 48) -> str:
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n))[0].text


def looks_like_python(text: str) -> bool:
    """Several distinct lines, brackets, a block opener and a common keyword: not one repeated token."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    keywords = ("return", "if ", "for ", "def ", "self", "in ", "not ", "None")
    return (len(set(lines)) >= 2 and "(" in text and ")" in text and ":" in text
            and any(k in text for k in keywords))


def snippet_perplexity(llm: LLM) -> float:
    ids = llm.engine.tokenizer.encode(SNIPPET)
    logits = llm.score([ids])[0]
    return math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def test_shipped_files_are_small_and_complete():
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "MODEL_CARD.md"} <= names
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) <= 8_000_000


def test_greedy_quicksort_is_deterministic_python(llm):
    first = greedy(llm, "def quicksort(")
    assert greedy(llm, "def quicksort(") == first
    assert looks_like_python(first), first


def test_snippet_perplexity_is_low(llm):
    assert snippet_perplexity(llm) < PPL_BOUND


def test_mtp_head_drafts_the_token_after_next(llm):
    """Top-1 accuracy of the MTP draft for token t+2 on the snippet: ~0.44 trained, 0 untrained."""
    ids = llm.engine.tokenizer.encode(SNIPPET)
    assert mtp_accuracy(llm.engine.runner.model, [ids]) > 0.25
