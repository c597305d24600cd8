"""/metrics in the Prometheus text exposition format (version 0.0.4), built from the engine's snapshot."""

from __future__ import annotations

import os

from .engine_loop import EngineInfo, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_metrics(model: str, state: str, snap: Snapshot, info: EngineInfo | None) -> str:
    label = f'model_name="{_escape(model)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, value: float) -> None:
        lines.extend([f"# HELP deltaserve_{name} {doc}", f"# TYPE deltaserve_{name} {kind}",
                      f"deltaserve_{name}{{{label}}} {value:.10g}"])

    metric("ready", "gauge", "1 when the model is loaded and requests are accepted.", float(state == "ready"))
    metric("requests_running", "gauge", "Requests holding a slot.", snap.running)
    metric("requests_waiting", "gauge", "Accepted requests waiting for a slot.", snap.waiting)
    metric("slots_in_use", "gauge", "State slots held by running requests.", snap.slots_in_use)
    metric("slots_total", "gauge", "State slots (parallel sequences).", info.num_slots if info else 0)
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", snap.prompt_tokens)
    metric("generation_tokens_total", "counter", "Tokens generated.", snap.generated_tokens)
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.", snap.tokens_per_second)
    metric("engine_steps_total", "counter", "Engine steps run.", snap.steps)
    metric("engine_overlapped_steps_total", "counter",
           "Decode steps launched before the previous step's tokens were read.", snap.overlapped_steps)
    metric("spec_draft_tokens_total", "counter", "MTP draft tokens verified (speculative decoding).", snap.draft_tokens)
    metric("spec_accepted_tokens_total", "counter", "MTP draft tokens accepted.", snap.accepted_tokens)
    metric("engine_step_errors_total", "counter", "Engine steps that raised.", snap.step_errors)
    for name, kind, doc in PREFIX_METRICS:
        metric(f"prefix_cache_{name}", kind, doc, snap.prefix.get(name, 0))
    lines.extend(["# HELP deltaserve_requests_finished_total Engine requests ended, by reason (stop, length, "
                  "abort, error).", "# TYPE deltaserve_requests_finished_total counter"])
    for reason, count in sorted(snap.finished.items()):
        lines.append(f'deltaserve_requests_finished_total{{{label},finish_reason="{_escape(reason)}"}} {count}')
    metric("state_pool_bytes", "gauge", "Conv windows and delta-rule states, all slots.",
           info.state_pool_bytes if info else 0)
    metric("kv_cache_bytes", "gauge", "KV cache of the attention layers, all slots.",
           info.kv_cache_bytes if info else 0)
    if (rss := _rss_bytes()) is not None:
        lines.extend(["# HELP process_resident_memory_bytes Resident memory size in bytes.",
                      "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"])
    return "\n".join(lines) + "\n"


PREFIX_METRICS = [
    ("queries_total", "counter", "Requests looked up in the prefix cache."),
    ("hits_total", "counter", "Requests that resumed from a cached prefix."),
    ("queried_tokens_total", "counter", "Prompt tokens of the requests looked up."),
    ("cached_tokens_total", "counter", "Prompt tokens served from the prefix cache instead of computed."),
    ("hit_rate", "gauge", "Share of looked-up prompt tokens served from the cache."),
    ("snapshots", "gauge", "Recurrent-state snapshots held."),
    ("snapshot_slots", "gauge", "Snapshot pool size (state slots)."),
    ("kv_blocks_used", "gauge", "KV blocks referenced or holding cached prefixes."),
    ("kv_blocks_cached", "gauge", "KV blocks indexed by prefix (evictable when unreferenced)."),
    ("kv_blocks_total", "gauge", "KV blocks of 16 positions in the pool."),
]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _rss_bytes() -> int | None:
    """Current (not peak) resident memory, from /proc on Linux; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
