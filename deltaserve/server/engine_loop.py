"""One background thread owns the LLMEngine; the asyncio side talks to it only through queues.

In: add / abort / stop commands on a thread-safe queue, drained before every step. Out: each step's
outputs, handed to the requests' asyncio queues with one loop.call_soon_threadsafe per step. Only this
thread ever touches the engine, so the engine needs no locks. A step that raises fails the requests
holding a slot (their cache state is unknown) and the loop goes on with the rest.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.llm_engine import LLMEngine
from ..engine.outputs import RequestOutput
from ..sampling.params import SamplingParams
from .protocol import ApiError

log = logging.getLogger("deltaserve.server")

IDLE_WAKEUP_S = 0.5  # an idle loop still refreshes its snapshot this often (tokens/s decays to 0)
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this window


@dataclass(frozen=True)
class EngineFailure:
    """Ends a request that the engine could not finish."""
    message: str
    status: int = 503


Event = RequestOutput | EngineFailure


@dataclass(frozen=True)
class Sink:
    """Where one HTTP request's events go: (engine request id, Event) items on an asyncio queue."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Event]]


@dataclass(frozen=True)
class EngineInfo:
    """Fixed once the model is loaded."""
    vocab_size: int
    max_model_len: int
    num_slots: int
    state_pool_bytes: int
    kv_cache_bytes: int


@dataclass(frozen=True)
class Snapshot:
    """What /metrics shows; replaced (never mutated) by the engine thread after every step."""
    running: int = 0
    waiting: int = 0
    slots_in_use: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0
    steps: int = 0
    overlapped_steps: int = 0  # decode steps launched before the previous step's tokens were read
    step_errors: int = 0
    draft_tokens: int = 0  # speculative decoding: MTP drafts verified / accepted
    accepted_tokens: int = 0
    prefix: dict[str, float] = field(default_factory=dict)  # prefix cache: counters and pool occupancy
    finished: dict[str, int] = field(default_factory=dict)  # finish reason (stop, length, abort, error) -> count


@dataclass(frozen=True)
class _Add:
    requests: list[tuple[str, list[int], SamplingParams]]
    sink: Sink


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str]
    reason: str  # for the metrics: "abort" (client gone, failure) or "stop" (a stop string, found by the server)


class _Stop:
    pass


class EngineLoop:
    def __init__(self, make_engine: Callable[[], LLMEngine], max_queue: int,
                 on_load_failure: Callable[[str], None] | None = None):
        self._make_engine, self._max_queue, self._on_load_failure = make_engine, max_queue, on_load_failure
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards state, _live, and the order of commands vs. _Stop
        self._live: set[str] = set()  # accepted and not yet finished, aborted or failed
        self._sinks: dict[str, Sink] = {}  # engine thread only
        self._rate: deque[tuple[float, int]] = deque()  # engine thread only: (time, generated tokens)
        self._finished: dict[str, int] = {}
        self._step_errors = 0
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self.state = "loading"  # -> ready -> draining -> stopping -> stopped, or loading -> failed
        self.error: str | None = None
        self.info: EngineInfo | None = None
        self.snapshot = Snapshot()

    # ------------------------------------------------------------- called from the asyncio side ----

    def start(self) -> None:
        self._thread.start()

    def ready_info(self) -> EngineInfo:
        """The loaded model's limits; 503 while loading, after a failed load, or when shutting down."""
        if self.state != "ready" or self.info is None:
            reason = {"loading": "the model is still loading", "failed": f"the model failed to load: {self.error}"}
            raise ApiError(503, f"server not ready: {reason.get(self.state, 'shutting down')}",
                           type="server_error", code="not_ready")
        return self.info

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]], sink: Sink) -> None:
        """Queues engine requests, all or none: 503 unless ready, 429 when the queue is full."""
        with self._lock:
            capacity = self.ready_info().num_slots + self._max_queue
            if len(self._live) + len(requests) > capacity:
                raise ApiError(429, f"server busy: {len(self._live)} requests in flight, at most {capacity} "
                                    f"({self.info.num_slots} slots + a queue of {self._max_queue}); retry later",
                               type="server_error", code="queue_full")
            self._live.update(rid for rid, _, _ in requests)
            self._commands.put(_Add(requests, sink))  # under the lock: never queued behind a _Stop

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        self._commands.put(_Abort(request_ids, reason))

    def drain(self) -> None:
        """Refuses new requests (503) and lets the ones in flight finish."""
        with self._lock:
            if self.state == "ready":
                self.state = "draining"

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancels whatever is still in flight (each gets a 503 failure) and joins the thread (timeout 0: don't
        wait for it)."""
        with self._lock:
            if self.state in ("loading", "ready", "draining"):
                self.state = "stopping"
                self._commands.put(_Stop())
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------------- engine thread ----

    def _run(self) -> None:
        try:
            engine = self._make_engine()
        except Exception as e:  # a bad checkpoint, not enough memory...: reported, never raised into a thread
            log.exception("model failed to load")
            with self._lock:
                self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            if self._on_load_failure:
                self._on_load_failure(self.error)
            return
        size = engine.cache.size
        self.info = EngineInfo(engine.cfg.vocab_size, engine.max_model_len, engine.scheduler.slots.size,
                               size.conv_bytes + size.state_bytes, size.kv_bytes)
        with self._lock:
            if self.state == "loading":
                self.state = "ready"
        log.info("engine ready: %s", engine.memory_report())
        while True:
            try:
                if not self._handle_commands(engine, block=not engine.has_unfinished_requests()):
                    break
                if engine.has_unfinished_requests():
                    self._step(engine)
                self._publish(engine)
            except Exception:  # a bug outside engine.step(): keep serving rather than leave every request hanging
                log.exception("engine loop error")
        shutdown = EngineFailure("the server is shutting down")
        for rid in list(self._sinks):
            engine.abort_request(rid)
            _deliver([(self._end(rid, "abort"), (rid, shutdown))])
        self._publish(engine)
        with self._lock:
            self.state = "stopped"

    def _handle_commands(self, engine: LLMEngine, block: bool) -> bool:
        """Runs every queued command; False once told to stop."""
        pending: list[tuple[Sink, tuple[str, Event]]] = []
        try:
            cmd = self._commands.get(timeout=IDLE_WAKEUP_S) if block else self._commands.get_nowait()
            while True:
                if isinstance(cmd, _Stop):
                    return False
                if isinstance(cmd, _Add):
                    for rid, prompt, params in cmd.requests:
                        self._sinks[rid] = cmd.sink
                        try:
                            engine.add_request(rid, prompt, params)
                        except Exception as e:  # the app validates first; this is the engine's last word
                            failure = EngineFailure(str(e), 400 if isinstance(e, ValueError) else 503)
                            pending.append((self._end(rid, "error"), (rid, failure)))
                else:
                    for rid in cmd.request_ids:
                        engine.abort_request(rid)
                        if rid in self._sinks:  # whoever aborts has stopped listening
                            self._end(rid, cmd.reason)
                cmd = self._commands.get_nowait()
        except queue.Empty:
            return True
        finally:
            _deliver(pending)

    def _step(self, engine: LLMEngine) -> None:
        pending: list[tuple[Sink, tuple[str, Event]]] = []
        try:
            outputs = engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests that hold a slot")
            self._step_errors += 1
            for seq in list(engine.scheduler.running):
                engine.abort_request(seq.request_id)
                if (rid := seq.request_id) in self._sinks:
                    pending.append((self._end(rid, "error"), (rid, EngineFailure(f"engine step failed: {e!r}"))))
            _deliver(pending)
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                self._end(out.request_id, out.finish_reason or "stop")
            pending.append((sink, (out.request_id, out)))
        _deliver(pending)

    def _end(self, rid: str, reason: str) -> Sink:
        """Forgets a request (its slot is already free) and returns where its last event should go."""
        sink = self._sinks.pop(rid)
        self._finished[reason] = self._finished.get(reason, 0) + 1
        with self._lock:
            self._live.discard(rid)
        return sink

    def _publish(self, engine: LLMEngine) -> None:
        now, st = time.monotonic(), engine.stats
        self._rate.append((now, st.generated_tokens))
        while now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        t0, g0 = self._rate[0]
        running = len(engine.scheduler.running)
        slots = engine.scheduler.slots
        self.snapshot = Snapshot(
            running=running, waiting=max(0, len(self._live) - running), slots_in_use=slots.size - slots.available,
            prompt_tokens=st.prompt_tokens, generated_tokens=st.generated_tokens,
            tokens_per_second=(st.generated_tokens - g0) / (now - t0) if now > t0 else 0.0,
            steps=st.steps, overlapped_steps=st.overlapped_steps, step_errors=self._step_errors,
            draft_tokens=st.draft_tokens, accepted_tokens=st.accepted_tokens, finished=dict(self._finished),
            prefix=engine.prefix_cache_stats(),
        )


def _deliver(items: list[tuple[Sink, tuple[str, Event]]]) -> None:
    """One call_soon_threadsafe per event loop for the whole batch of events."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[str, Event]]]] = {}
    for sink, item in items:
        by_loop.setdefault(sink.loop, []).append((sink.queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the event loop is closed: nobody is left to read these
            pass


def _put_all(batch: list[tuple[asyncio.Queue, tuple[str, Event]]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
