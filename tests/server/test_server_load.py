"""The live server under load and through its life: concurrent streams get their solo answers, disconnects and
step failures free only their own slots, a soak with random cancellations, a full queue, graceful and forced
shutdown, speculative decoding and cache-size options."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time

import httpx
import openai
import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.server import ServerConfig
from http_calls import AUTH, PROMPTS, client, metrics, post, sse_events, wait_idle
from live_server import API_KEY, LiveServer


# --------------------------------------------------------------------------------- concurrency ----

def test_concurrent_streams_each_get_their_solo_answer(server):
    """20 streaming clients on 8 slots: each gets exactly what it gets alone."""
    c = client(server)
    kinds = ["chat" if i % 3 == 0 else "text" for i in range(len(PROMPTS))]

    def args(i: int) -> dict:
        common = {"model": "tiny", "max_tokens": 6 + i % 7, "temperature": 0}
        if kinds[i] == "chat":
            return {**common, "messages": [{"role": "user", "content": PROMPTS[i]}]}
        return {**common, "prompt": PROMPTS[i]}

    solo = [c.chat.completions.create(**args(i)).choices[0].message.content if kinds[i] == "chat" else
            c.completions.create(**args(i)).choices[0].text for i in range(len(PROMPTS))]

    async def one(ac: openai.AsyncOpenAI, i: int) -> str:
        if kinds[i] == "chat":
            stream = await ac.chat.completions.create(**args(i), stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])
        stream = await ac.completions.create(**args(i), stream=True)
        return "".join([ch.choices[0].text async for ch in stream])

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(len(PROMPTS))))

    before = metrics(server)
    assert asyncio.run(together()) == solo
    after = metrics(server)
    assert after["generation_tokens_total"] > before["generation_tokens_total"]
    overlapped = after["engine_overlapped_steps_total"] - before["engine_overlapped_steps_total"]
    assert (overlapped > 0) == bool(server.config.overlap_decode)
    wait_idle(server)


def test_disconnect_frees_the_slot(server):
    body = {"prompt": PROMPTS[5], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    aborted = metrics(server).get("requests_finished_total{abort}", 0)
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(server)["slots_in_use"] == 1
    m = wait_idle(server)  # the stream was closed after one chunk
    assert m["requests_finished_total{abort}"] == aborted + 1
    server.step_delay_s = 0.01  # 240 steps: far longer than the client waits
    try:
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            post(server, "/v1/completions", json=body, timeout=0.3)
        assert wait_idle(server)["requests_finished_total{abort}"] == aborted + 2
    finally:
        server.step_delay_s = 0.0


def test_engine_step_failure_fails_only_its_requests(server):
    server.fail_next_step.set()
    r = post(server, "/v1/completions", json={"prompt": PROMPTS[6], "max_tokens": 4})
    assert r.status_code == 503 and "injected fault" in r.json()["error"]["message"]
    m = wait_idle(server)
    assert m["engine_step_errors_total"] == 1 and m["requests_finished_total{error}"] == 1
    assert post(server, "/v1/completions", json={"prompt": PROMPTS[6], "max_tokens": 4}).status_code == 200


# --------------------------------------------------------------------------------------- soak ----

def test_soak_with_random_cancellations(server):
    """A few hundred mixed requests, a third cancelled at random: every slot comes back, memory stays flat."""
    rng = random.Random(0)

    async def one(http: httpx.AsyncClient, slots: asyncio.Semaphore, i: int) -> str:
        chat = rng.random() < 0.4
        body = {"max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.8]), "seed": i,
                "stream": rng.random() < 0.5}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        else:
            body["prompt"] = rng.choice(PROMPTS)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        cancel_after = rng.uniform(0, 0.1) if rng.random() < 0.33 else None
        async with slots:  # 24 clients at a time; the cancel timer starts when the request is sent
            try:
                r = await asyncio.wait_for(http.post(path, json=body), cancel_after)
            except asyncio.TimeoutError:
                return "cancelled"
        assert r.status_code == 200, r.text
        assert r.text.endswith("data: [DONE]\n\n") if body["stream"] else r.json()["usage"]["total_tokens"]
        return "ok"

    async def run(n: int) -> list[str]:
        slots = asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
            return await asyncio.gather(*(one(http, slots, i) for i in range(n)))

    asyncio.run(run(300))  # warm-up round: allocator pools, lazily built things; memory must then stay flat
    gc.collect()
    m0 = wait_idle(server)
    t0 = time.monotonic()
    results = asyncio.run(run(300))
    elapsed = time.monotonic() - t0
    gc.collect()
    m1 = wait_idle(server)
    generated = m1["generation_tokens_total"] - m0["generation_tokens_total"]
    aborts = m1["requests_finished_total{abort}"] - m0.get("requests_finished_total{abort}", 0)
    rss0, rss1 = (m["process_resident_memory_bytes"] / 2**20 for m in (m0, m1))
    print(f"\nsoak: 300 requests ({results.count('cancelled')} cancelled) in {elapsed:.1f}s, {generated:.0f} tokens, "
          f"{aborts:.0f} engine requests aborted, RSS {rss0:.0f} -> {rss1:.0f} MiB")
    assert results.count("ok") > 150 and results.count("cancelled") > 50 and aborts > 20
    assert m1.get("requests_finished_total{error}", 0) == m0.get("requests_finished_total{error}", 0)
    assert rss1 - rss0 < 24, f"RSS grew {rss1 - rss0:.1f} MiB"


# ------------------------------------------------------- loading, queue full, graceful shutdown ----

def test_loading_queue_full_and_graceful_shutdown(model_dir):
    loaded = threading.Event()
    live = LiveServer(ServerConfig(model_dir, max_num_seqs=1, max_model_len=256, max_queue=1),
                      before_load=lambda: loaded.wait(30))
    try:
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert httpx.get(live.url + "/health").status_code == 503
        loaded.set()
        live.wait_ready()
        long = {"prompt": "hi", "max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
                first = asyncio.create_task(http.post("/v1/completions", json=long))
                second = asyncio.create_task(http.post("/v1/completions", json=long))
                while live.engine_loop.snapshot.waiting + live.engine_loop.snapshot.running < 2:
                    await asyncio.sleep(0.01)
                full = await http.post("/v1/completions", json={"prompt": "hi"})
                assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
                await asyncio.to_thread(live.stop)  # graceful: both in-flight requests finish
                return await asyncio.gather(first, second)

        for r in asyncio.run(scenario()):
            events = sse_events(r.text.splitlines())
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            assert events[-2]["usage"]["completion_tokens"] == 150
        assert not live.thread.is_alive() and not live.engine_loop.alive and live.engine_loop.state == "stopped"
    finally:
        loaded.set()
        live.stop()


def test_shutdown_cancels_cleanly_after_the_grace_period(model_dir):
    live = LiveServer(ServerConfig(model_dir, max_num_seqs=1, max_model_len=1024), grace_s=0.3)
    live.wait_ready()
    live.step_delay_s = 0.002  # 1000 steps: far longer than the grace period however fast the engine
    long = {"prompt": "hi", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            streaming = asyncio.create_task(http.post("/v1/completions", json={**long, "stream": True}))
            while live.engine_loop.snapshot.running < 1:  # the stream holds the one slot before the other arrives
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(http.post("/v1/completions", json=long))
            while live.engine_loop.snapshot.waiting + live.engine_loop.snapshot.running < 2:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(live.stop)
            return await asyncio.gather(streaming, queued)

    streaming, queued = asyncio.run(scenario())
    events = sse_events(streaming.text.splitlines())
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
    assert queued.status_code == 503 and "shutting down" in queued.json()["error"]["message"]
    assert not live.thread.is_alive() and not live.engine_loop.alive and live.engine_loop.state == "stopped"


def test_speculative_decoding_server_counts_drafts():
    """--spec-tokens: same greedy text as without, and the acceptance counters in /metrics move."""
    from deltaserve.models import DEFAULT_MODEL

    live = LiveServer(ServerConfig(DEFAULT_MODEL, served_model_name="default", api_key=API_KEY, max_num_seqs=4,
                                   max_model_len=256, spec_tokens=2))
    live.wait_ready()
    try:
        got = client(live).completions.create(model="default", prompt="def quicksort(", max_tokens=24, temperature=0)
        want = LLM(DEFAULT_MODEL, dtype="float32", max_model_len=256).generate(
            "def quicksort(", SamplingParams(max_tokens=24, temperature=0))[0]
        assert got.choices[0].text == want.text
        m = metrics(live)
        assert m["spec_draft_tokens_total"] > 0 and 0 < m["spec_accepted_tokens_total"] <= m["spec_draft_tokens_total"]
    finally:
        live.stop()


def test_kv_cache_size_and_no_prefix_cache_options(model_dir):
    live = LiveServer(ServerConfig(model_dir, served_model_name="tiny", api_key=API_KEY, max_num_seqs=2,
                                   max_model_len=256, kv_cache_tokens=300, enable_prefix_caching=False))
    try:
        live.wait_ready()
        c = client(live)
        for _ in range(2):  # the same prompt twice: nothing cached with the cache off
            reply = c.completions.create(model="tiny", prompt=PROMPTS[2] * 4, max_tokens=4, temperature=0)
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
        m = metrics(live)
        assert m["prefix_cache_kv_blocks_total"] == 19 and m["prefix_cache_snapshot_slots"] == 0  # ceil(300 / 16)
        assert m["prefix_cache_queries_total"] == 0
    finally:
        live.stop()
