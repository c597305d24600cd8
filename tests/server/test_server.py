"""The OpenAI-compatible server, live on 127.0.0.1: the real openai client and raw HTTP (httpx) against each
endpoint, and malformed requests (test_server_load.py: concurrency, soak, start-up and shutdown)."""

from __future__ import annotations

import httpx
import openai
import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.server.chat_template import ChatTemplate
from http_calls import AUTH, PROMPTS, client, metrics, post, sse_events
from live_server import API_KEY


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
