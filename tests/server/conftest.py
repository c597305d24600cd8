"""Fixtures: a tiny random Qwen3.5 checkpoint with a trained tokenizer and chat template, and a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from live_server import API_KEY, VOCAB, LiveServer, train_tokenizer
from deltaserve.kernels import cpu_native
from deltaserve.server import ServerConfig
from tiny_models import save_hf_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat")
    tok = train_tokenizer(path)
    assert tok.get_vocab_size() == VOCAB
    # 4 layers: three Gated-DeltaNet layers and one attention layer
    save_hf_model("qwen3_5", path, vocab_size=VOCAB, num_hidden_layers=4, eos_token_id=tok.token_to_id("<|im_end|>"))
    return path


@pytest.fixture(scope="session", autouse=True)
def native_kernels_built() -> None:
    """The CPU kernels compile on first use (~1 min on 2 cores): before any server starts, whose readiness wait
    would otherwise time out while its engine compiles them."""
    cpu_native.ops()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only fight each other (50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[False, True], ids=["step-by-step", "overlapped"])
def server(model_dir, request) -> Iterator[LiveServer]:
    """Every server test runs twice: greedy decode steps waited for one by one, and overlapped (CUDA's default)."""
    live = LiveServer(ServerConfig(model_dir, served_model_name="tiny", api_key=API_KEY, max_num_seqs=8,
                                   max_model_len=256, max_queue=64, overlap_decode=request.param))
    live.wait_ready()
    yield live
    live.stop()
    assert not live.thread.is_alive() and not live.engine_loop.alive, "shutdown left a thread running"
