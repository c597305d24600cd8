"""Tensor-parallel worker processes: ranks 1..N-1 load their shard and run every step rank 0's engine runs.

Rank 0 keeps the engine (scheduling, sampling, stop conditions); its runner is wrapped in `MirroredRunner`, which
sends each call it receives (method name and arguments: segments, sampling draws, hidden states) to the workers
before making it itself. Every rank then runs the same step on its own heads and slots, and the layers' partial
outputs meet in the group's all-reduces; only rank 0 reads the logits. A call that fails (a bad batch) fails on
every rank alike: the workers drop the error and wait for the next call, rank 0 raises it to its caller.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import multiprocessing
import signal
import weakref

import torch

from .group import TPGroup, broadcast_object, free_port

log = logging.getLogger(__name__)
STOP = "__stop__"


class MirroredRunner:
    """A ModelRunner whose methods (and its cache's) run on every rank; other attributes pass through."""

    def __init__(self, runner, group: TPGroup, prefix: str = ""):
        self._target, self._group, self._prefix = runner, group, prefix

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if name == "cache" and not self._prefix:
            return MirroredRunner(value, self._group, "cache.")
        if not inspect.ismethod(value) or name.startswith("_"):  # data, modules (runner.model): as they are
            return value

        def mirrored(*args, **kwargs):
            self._group.broadcast_object((self._prefix + name, to_device((args, kwargs), "cpu")))
            return value(*args, **kwargs)
        return mirrored


def to_device(obj, device):
    """obj with every tensor inside (lists, tuples, dicts, dataclasses) moved to device: calls cross processes on
    the host, and each rank's tensors live on its own GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _serve(rank: int, size: int, port: int, path: str, device: str, dtype: torch.dtype, threads: int,
           engine_kwargs: dict) -> None:
    """A worker's life: join the group, load the rank's shard, build the same cache and runner, mirror calls."""
    from ..engine.llm_engine import LLMEngine
    from ..weights.loader import load_model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops the workers
    torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":  # rank r on GPU r
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    group = TPGroup(rank, size, port, torch.device(device))
    model, cfg = load_model(path, dtype, device, tp=(rank, size))
    model.set_tensor_parallel(group)
    runner = LLMEngine(model, cfg, None, device=device, **engine_kwargs).runner
    while (msg := group.broadcast_object()) != STOP:
        name, (args, kwargs) = msg
        args, kwargs = to_device((args, kwargs), device)
        target = runner.cache if name.startswith("cache.") else runner
        try:
            getattr(target, name.rpartition(".")[2])(*args, **kwargs)
        except Exception as e:  # rank 0 raised the same error to its caller
            log.debug("rank %d: %s failed alike: %s", rank, name, e)


def start_group(path: str, device: str, dtype: torch.dtype, size: int, engine_kwargs: dict) -> TPGroup:
    """Spawns ranks 1..size-1 (each loading its shard of path) and joins them as rank 0; they stop when the group
    object is collected (or the process exits)."""
    port, ctx = free_port(), multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_serve, args=(r, size, port, str(path), device, dtype, torch.get_num_threads(),
                                                engine_kwargs), daemon=True) for r in range(1, size)]
    for p in procs:
        p.start()
    group = TPGroup(0, size, port, torch.device(device))
    weakref.finalize(group, _stop, group.control, procs)
    return group


def _stop(control, procs) -> None:
    try:
        broadcast_object(control, 0, STOP)
    except Exception:  # a worker already gone: nothing to stop
        pass
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
