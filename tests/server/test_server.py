"""The OpenAI-compatible server, live on 127.0.0.1: the real openai client and raw HTTP (httpx)."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import threading
import time

import httpx
import openai
import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.server import ServerConfig
from deltaserve.server.chat_template import ChatTemplate
from live_server import API_KEY, LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = [f"def f{i}(x):\n    return x + {i}" if i % 2 else f"import os{i}\nclass A{i}:" for i in range(20)]


def client(server: LiveServer, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def post(server: LiveServer, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, headers=AUTH, **{"timeout": 30, **kwargs})


def metrics(server: LiveServer) -> dict[str, float]:
    """{'requests_running': 0.0, 'requests_finished_total{abort}': 3.0, ...} from the Prometheus text."""
    out = {}
    for line in httpx.get(server.url + "/metrics", headers=AUTH).text.splitlines():
        if line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        key = name.split("{")[0].removeprefix("deltaserve_")
        if 'finish_reason="' in name:
            key += "{" + name.split('finish_reason="')[1].split('"')[0] + "}"
        out[key] = float(value)
    return out


def wait_idle(server: LiveServer, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["requests_running"] == m["requests_waiting"] == m["slots_in_use"] == 0:
            return m
        assert time.monotonic() < deadline, f"server did not go idle: {m}"
        time.sleep(0.02)


def sse_events(lines) -> list:
    """Parsed `data:` payloads of an SSE stream; '[DONE]' stays a string."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model_dir, max_num_seqs=1, max_model_len=256)


# ------------------------------------------------------------------------------ basic endpoints ----

def test_health_models_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    m = metrics(server)
    for name in ("requests_running", "requests_waiting", "generation_tokens_total", "generation_tokens_per_second",
                 "slots_in_use", "slots_total", "state_pool_bytes", "kv_cache_bytes", "process_resident_memory_bytes"):
        assert name in m, name
    assert m["slots_total"] == 8 and m["state_pool_bytes"] > 0 and m["kv_cache_bytes"] > 0


def test_completion_is_the_offline_greedy_answer(server, offline):
    ids = offline.engine.tokenizer.encode(PROMPTS[0])
    want = offline.generate(ids, SamplingParams(max_tokens=12, temperature=0))[0]
    got = client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == offline.engine.tokenizer.decode(want.token_ids)
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.token_ids))
    by_ids = post(server, "/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == got.choices[0].text


def test_a_chats_next_turn_reports_its_cached_prompt_tokens(server):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field) and /metrics' prefix cache counters: the second
    turn resumes where the first ended (its prompt + reply, but the reply's last token, which it feeds again)."""
    c = client(server)
    messages = [{"role": "user", "content": "Tell me about os.path and sys.argv, " * 6}]
    first = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    before = metrics(server)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And pathlib?"}]
    second = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    after = metrics(server)
    assert after["prefix_cache_cached_tokens_total"] - before["prefix_cache_cached_tokens_total"] == cached
    assert after["prefix_cache_hits_total"] == before["prefix_cache_hits_total"] + 1
    assert after["prefix_cache_snapshots"] >= 1 and after["prefix_cache_kv_blocks_total"] > 0


def test_completion_stream(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and all(ch.usage is None for ch in chunks[:-1])
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # OpenAI's own shape


def test_chat_and_chat_stream(server, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is os.path?"}]
    c = client(server)
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    rendered = ChatTemplate.from_dir(model_dir).render(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt_ids = server.app.state.ctx.tokenizer.encode(rendered)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason and chunks[-1].usage == whole.usage
    raw = post(server, "/v1/completions", json={"prompt": prompt_ids, "max_tokens": 10, "temperature": 0}).json()
    assert raw["choices"][0]["text"] == whole.choices[0].message.content  # the template is the only difference


def test_logprobs(server):
    got = client(server).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == got.usage.completion_tokens
    for top, v in zip(lp.top_logprobs, lp.token_logprobs):  # greedy: the sampled token is the most likely
        assert 1 <= len(top) <= 3 and max(top.values()) <= v + 1e-6
    chat = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_stop_strings_and_stop_ids(server, offline):
    ids = offline.engine.tokenizer.encode(PROMPTS[3])
    tokens = offline.generate(ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    text = offline.engine.tokenizer.decode(tokens)
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    body = {"prompt": ids, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": ["@@never@@", stop]}
    got = post(server, "/v1/completions", json=body).json()["choices"][0]
    assert (got["text"], got["finish_reason"]) == (text[:text.index(stop)], "stop")
    events = sse_events(post(server, "/v1/completions", json={**body, "stream": True}).text.splitlines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == got["text"] and events[-1] == "[DONE]"
    k = tokens.index(tokens[4])
    got = post(server, "/v1/completions", json={**body, "stop": None, "stop_token_ids": [tokens[4]]}).json()
    assert got["usage"]["completion_tokens"] == k + 1 and got["choices"][0]["finish_reason"] == "stop"


def test_n_with_seed(server):
    body = {"prompt": PROMPTS[4], "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "n": 3}
    first = post(server, "/v1/completions", json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert post(server, "/v1/completions", json=body).json()["choices"] == first["choices"]
    third = post(server, "/v1/completions", json={**body, "n": 1, "seed": 9}).json()
    assert third["choices"][0]["text"] == first["choices"][2]["text"]  # choice i samples with seed + i
    assert first["usage"]["completion_tokens"] == 24 or any(c["finish_reason"] == "stop" for c in first["choices"])
    events = sse_events(post(server, "/v1/completions", json={**body, "stream": True}).text.splitlines())
    streamed = ["".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == [c["text"] for c in first["choices"]] and events[-2]["usage"] == first["usage"]


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


# ------------------------------------------------------------------------------------- errors ----

BAD = [  # (endpoint, body, status, param)
    ("completions", b'{"prompt": "hi",', 400, None),
    ("completions", b'["not", "an", "object"]', 400, None),
    ("completions", {"prompt": "hi", "max_tokens": "10"}, 422, "max_tokens"),
    ("completions", {"max_tokens": 5}, 422, "prompt"),
    ("chat/completions", {"messages": "hello"}, 422, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ("completions", {"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, 422, "n"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("completions", {"prompt": "hi", "logprobs": 21}, 422, "logprobs"),
    ("completions", {"prompt": "hi", "seed": -1}, 422, "seed"),
    ("completions", {"prompt": ""}, 400, None),
    ("completions", {"prompt": [7] * 256}, 413, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, 413, "prompt"),
    ("completions", {"prompt": [7] * 200, "max_tokens": 100}, 400, "max_tokens"),
    ("completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "stop_token_ids": [-3]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("completions", {"prompt": "hi", "echo": True}, 400, None),
    ("completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, None),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, None),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{s}-{i}" for i, (_, _, s, _) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, endpoint, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = post(server, f"/v1/{endpoint}", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v1/nope", headers=AUTH).json()["error"]["message"] == "Not Found"
    assert httpx.get(server.url + "/v1/completions", headers=AUTH).status_code == 405


def test_auth(server):
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/metrics", "GET")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "hi"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200


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
