"""Test helpers: a trained byte-level BPE tokenizer with a ChatML template, and a live uvicorn server
on 127.0.0.1 (in a thread of the test process, on a free port)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.server import ServerConfig, create_app
from deltaserve.server.serve import DrainingServer

API_KEY = "test-key"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 512
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(path: Path) -> Tokenizer:
    """Byte-level BPE trained on some stdlib sources; the special tokens get ids 0, 1, 2."""
    stdlib = Path(json.__file__).parent.parent
    texts = [f.read_text(errors="ignore") for f in sorted(stdlib.glob("*.py"))[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


class LiveServer:
    """uvicorn serving create_app(config) in a thread; fail_next_step makes the engine's next step raise,
    step_delay_s slows every step (so that a request outlives a client's timeout however fast the engine)."""

    def __init__(self, config: ServerConfig, before_load: Callable[[], None] | None = None, grace_s: float = 10.0):
        self.config = config
        self.fail_next_step = threading.Event()
        self.step_delay_s = 0.0

        def make_engine() -> LLMEngine:
            if before_load:
                before_load()
            engine = LLMEngine.from_pretrained(config.model, **config.engine_options())
            for name in ("run", "launch_decode"):  # every way a step reaches the model
                setattr(engine.runner, name, self._faulty(getattr(engine.runner, name)))
            return engine

        self.app = create_app(config, make_engine=make_engine)
        self.engine_loop = self.app.state.ctx.engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = DrainingServer(uvicorn.Config(self.app, log_level="warning", access_log=False),
                                     self.engine_loop, grace_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def _faulty(self, run: Callable) -> Callable:
        def faulty_run(*args, **kwargs):  # fails mid-step: sequences already hold slots
            if self.fail_next_step.is_set():
                self.fail_next_step.clear()
                raise RuntimeError("injected fault")
            time.sleep(self.step_delay_s)
            return run(*args, **kwargs)
        return faulty_run

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "engine did not become ready"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
