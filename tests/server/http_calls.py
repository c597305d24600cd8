"""Helpers for tests against a live server (live_server.py): HTTP calls with the key, the Prometheus metrics as a
dict, waiting for idle, SSE parsing, and the prompts the tests send."""

from __future__ import annotations

import json
import time

import httpx
import openai

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
