"""The C++ CPU kernels of `csrc/`: weights packed from the file's own formats and the products on them, the MoE
block, and the decode steps of the GDN and attention layers (issues 9 and 15).

Built on first use with torch's extension builder (g++ and ninja; ~1 min once, then cached under
~/.cache/torch_extensions) for the SIMD the CPU has, read from its flags: AVX-512 with VNNI, AVX-512, AVX2 or
plain C (`DELTASERVE_CPU_ISA=avx2|avx512|generic` caps it; AMX is never used: VMs advertise it unusable). Where
it cannot be built, `ops()` returns None and callers keep the torch path, which is also the oracle these kernels
are tested against (tests/test_cpu_native.py, tests/test_cpu_quantized.py).

R = rows, K = inputs, N = outputs, B = sequences, C = conv channels, H = V heads, Dv = V head dim.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import time
import warnings
import weakref

import torch

from .quantized import QuantizedWeight, segments_of

CSRC = os.path.join(os.path.dirname(__file__), "csrc")
ISA_LEVELS = ("generic", "avx2", "avx512", "avx512-vnni")  # each needs the CPU flags of the one before and its own
ISA_NEEDS = {"avx2": ("avx2", "fma", "f16c"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
             "avx512-vnni": ("avx512_vnni",)}
ISA_FLAGS = {"generic": [], "avx2": ["-mavx2", "-mfma", "-mf16c"],
             "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
             "avx512-vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                             "-mavx512vnni"]}


def _sources_digest() -> str:
    """Hash of every file under csrc/: part of the module's name, so an edited header rebuilds it (torch's
    builder hashes only the listed source, not what it includes)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(CSRC)):
        with open(os.path.join(CSRC, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


def cpu_isa() -> str:
    """The best ISA level this CPU's flags allow, capped by DELTASERVE_CPU_ISA."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    try:
        flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    level = "generic"
    for name in ISA_LEVELS[1:]:
        if not all(f in flags for f in ISA_NEEDS[name]):
            break
        level = name
    cap = os.environ.get("DELTASERVE_CPU_ISA", level)
    if cap not in ISA_LEVELS:
        raise ValueError(f"DELTASERVE_CPU_ISA must be one of {', '.join(ISA_LEVELS)}, got {cap!r}")
    return min(level, cap, key=ISA_LEVELS.index)


@functools.cache
def ops(isa: str | None = None):
    """The compiled module for `isa` (default: cpu_isa()), or None (with one warning) where no C++ toolchain can
    build it."""
    if os.environ.get("DELTASERVE_NO_NATIVE") == "1":
        return None
    isa = isa or cpu_isa()
    try:
        from torch.utils.cpp_extension import load
        # -fopenmp: at::parallel_for is header code, threaded only when compiled with OpenMP; the library
        # resolves to the libgomp torch already loaded, so both share one thread pool
        name = f"deltaserve_cpu_ops_{_sources_digest()}_{isa.replace('-', '_')}"
        _drop_stale_lock(name)
        return load(name, [os.path.join(CSRC, "cpu_ops.cpp")],
                    extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler / ninja: the torch path still runs, only slower
        warnings.warn(f"deltaserve: CPU kernels not built ({err}); using the torch path")
        return None


STALE_LOCK_S = 600  # a build takes 1-2 minutes here; a lock this old was left by a process killed mid-build


def _drop_stale_lock(name: str) -> None:
    """torch's extension loader waits forever on its build directory's lock file; a process killed while building
    leaves one behind, and every later load (the server's, the tests') would hang on it."""
    from torch.utils.cpp_extension import _get_build_directory
    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
            warnings.warn(f"deltaserve: removed a stale build lock {lock}")
    except OSError:  # no lock: the usual case
        pass


def flush_denormals() -> None:
    """Denormal floats flushed to zero on the calling thread and the OpenMP pool's threads (x86 FTZ + DAZ): the
    delta rule's decay products underflow into denormals, on which x86 runs ~100x slower (a 128-token prefill of the
    338M checkpoint: 416 -> 523 t/s on an Intel Xeon, benchmarks/RESULTS.md). Per thread and lasting: the CPU runner
    calls it from the thread that runs its steps (and again if the pool grows); the rest of the process computes
    without denormals from then on (differences below 1.2e-38)."""
    ops().flush_denormals()


def keep_freed_memory() -> None:
    """Makes glibc keep freed memory for reuse instead of handing blocks back to the OS. Its allocator maps every
    block above its mmap threshold (32 MB at most) afresh and unmaps it on free, so each prefill's activations (a
    2044 x 12352 float32 projection is 100 MB) page-fault in again: ~12 ms per 42 MB here, 9% of a 2044-token
    prefill of the 338M checkpoint (benchmarks/RESULTS.md, issue 15). llama.cpp reuses one compute buffer to the
    same end. The process's resident size no longer shrinks after a long prompt. Process-wide, so the CPU runner
    calls it once, at its first long step (while loading, the CLI has large freed buffers go back to the OS:
    cli/main.py); a no-op where the C library is not glibc."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    mallopt(m_mmap_max, 0)  # every block from the heap
    mallopt(m_trim_threshold, 1 << 30)  # and freed heap memory kept, up to 1 GiB of free top


def applies(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the native kernels: float32 on the CPU, no autograd, built."""
    return (not torch.is_grad_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and ops() is not None)


def is_packed(weight) -> bool:
    """Whether `weight` is a packed CPU weight (ops().PackedWeight)."""
    return type(weight).__name__ == "PackedWeight" and hasattr(weight, "segments")


def pack(weight: torch.Tensor | QuantizedWeight, isa: str | None = None):
    """A float weight [N, K] / [E, N, K] (float32, float16 or bfloat16) or a QuantizedWeight -> the packed layout the
    kernels read (csrc/packed.h): same values, the file's format kept, about the same bytes. isa: for the module
    built for that ISA (default: this CPU's)."""
    shape = tuple(weight.shape)
    col_perm = weight.col_perm if isinstance(weight, QuantizedWeight) else None
    segments, row = [], 0
    for seg in segments_of(weight):
        raw = seg.data if len(shape) == 3 else seg.data[None]  # [E, rows, row bytes]
        segments.append(ops(isa).pack_segment(int(seg.qtype), row, raw.contiguous()))
        row += raw.shape[1]
    return ops(isa).PackedWeight(shape[-2], shape[-1], segments, col_perm)


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x [..., K] float32 @ packed weight^T -> [..., N]; a row's result does not depend on the other rows."""
    return ops().linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.n)


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """Rows `ids` of a packed weight, dequantized: [..., K] float32."""
    return weight.rows(0, ids.reshape(-1)).view(*ids.shape, weight.k)


def moe_block(x: torch.Tensor, moe) -> torch.Tensor:
    """The whole SparseMoE block (router, top-k, routed and shared SwiGLU experts) of x [R, D] -> [R, D], any R;
    the module's weights packed."""
    return ops().moe_block(x.contiguous(), *_moe_args(moe))


def _moe_args(moe) -> tuple:
    return (moe.router.weight, moe.experts_gate_up, moe.experts_down, moe.shared.gate_up.weight,
            moe.shared.down.weight, moe.shared_gate.weight, moe.top_k, moe.norm_topk)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, x / rms(x) * (1 + weight) of that sum) over the last dim; residual may be None."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    res = None if residual is None else residual.reshape(rows.shape).contiguous()
    total, out = ops().add_rms_norm(rows, res, weight, eps)
    return total.view(x.shape), out.view(x.shape)


def gdn_decode(mixed, z, a, b, layer, conv_pool: torch.Tensor, ssm_pool: torch.Tensor, batch) -> torch.Tensor:
    """One token per sequence through a GatedDeltaNet layer between its two projections.

    mixed [B, C] pre-conv q|k|v; z [B, H*Dv]; a, b [B, H]; layer: the GatedDeltaNet (conv weight, gates,
    norm); pools updated in place at batch.slots. Returns the gated-RMS-normed output [B, H*Dv]."""
    return ops().gdn_decode(mixed.contiguous(), z.contiguous(), a.contiguous(), b.contiguous(),
                            layer.conv_weight, layer.A_log, layer.dt_bias, layer.norm.weight, layer.norm.eps,
                            conv_pool, ssm_pool, batch.slots, batch.reset, layer.hk, layer.dk)


def attention_decode(qg, k, v, layer, kv: tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor:
    """One token per sequence through a GatedAttention layer between its projections.

    qg [B, H*2D] rows per head [q | gate]; k, v [B, G*D]; kv: the layer's paged caches [NB, BS, G, D], written at
    (batch.token_slots, batch.positions) through the batch's block table. Returns the gated attention output
    [B, H*D]."""
    return ops().attention_decode(qg.contiguous(), k.contiguous(), v.contiguous(), layer.q_norm.weight,
                                  layer.k_norm.weight, layer.q_norm.eps, layer.rotary.rotary_dim, layer.rotary.theta,
                                  kv[0], kv[1], batch.blocks_for(kv[0]), batch.token_slots, batch.positions,
                                  layer.d ** -0.5)


def gdn_verify(mixed, z, a, b, layer, conv_pool: torch.Tensor, ssm_pool: torch.Tensor, segment) -> torch.Tensor:
    """A verify segment's L tokens (rows of mixed [L, C], z, a, b) one by one through gdn_decode at its slot; the
    conv window and delta-rule state after token j copied to segment.snapshot_slots[j]. Returns [L, H*Dv]."""
    slots, outs = torch.tensor([segment.slot]), []
    for j in range(len(segment.token_ids)):
        reset = torch.tensor([segment.start_pos == 0 and j == 0])
        outs.append(ops().gdn_decode(*(t[j:j + 1].contiguous() for t in (mixed, z, a, b)), layer.conv_weight,
                                     layer.A_log, layer.dt_bias, layer.norm.weight, layer.norm.eps, conv_pool,
                                     ssm_pool, slots, reset, layer.hk, layer.dk))
        if j < len(segment.snapshot_slots):
            for pool in (conv_pool, ssm_pool):
                pool[segment.snapshot_slots[j]] = pool[segment.slot]
    return torch.cat(outs)


def attention_verify(qg, k, v, layer, kv: tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor:
    """A one-segment batch's verify segment: its L tokens one by one through attention_decode at positions
    start .. start + L - 1."""
    segment, table = batch.segments[0], batch.blocks_for(kv[0])
    slots = torch.tensor([segment.slot])
    return torch.cat([ops().attention_decode(
        *(t[j:j + 1].contiguous() for t in (qg, k, v)), layer.q_norm.weight, layer.k_norm.weight, layer.q_norm.eps,
        layer.rotary.rotary_dim, layer.rotary.theta, kv[0], kv[1], table, slots, torch.tensor([segment.start_pos + j]),
        layer.d ** -0.5) for j in range(len(segment.token_ids))])


def decoder_layer(x: torch.Tensor, residual: torch.Tensor | None, layer, cache: tuple[torch.Tensor, torch.Tensor],
                  batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence through a whole DecoderLayer (weights packed), with its forward's
    arguments and results (x, residual [B, D] -> FFN output, residual stream). The residual add, norms and token
    mixer (both projections included) are one native call, a MoE FFN another. cache: the layer's (conv,
    delta-rule) pools or (K, V) caches, updated in place at the batch's slots."""
    mixer, weights, moe = _layer_args(layer)  # residual may have any strides: the block adds it into a new tensor
    if layer.kind == "linear_attention":
        stream, h = mixer(x.contiguous(), residual, *weights, cache[0], cache[1], batch.slots, batch.reset)
    else:
        stream, h = mixer(x.contiguous(), residual, *weights, cache[0], cache[1], batch.blocks_for(cache[0]),
                          batch.token_slots, batch.positions)
    return (ops().moe_block(h, *moe) if moe else layer.ffn(h)), stream


_LAYER_ARGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_args(layer) -> tuple:
    """(native mixer function, its weight and size arguments, the MoE block's or None), gathered once per layer:
    collecting ~25 module attributes every step costs more than the layer's small kernels. Holds the parameter
    tensors themselves, so in-place updates are seen (parameters replaced by new tensors are not)."""
    if layer not in _LAYER_ARGS:
        m = layer.mixer
        norms = (layer.input_norm.weight, layer.post_norm.weight, layer.input_norm.eps)
        if layer.kind == "linear_attention":
            mixer = (ops().gdn_block, (*norms, m.in_proj.weight, m.out_proj.weight, m.conv_weight, m.A_log, m.dt_bias,
                                       m.norm.weight, m.norm.eps, m.hk, m.dk))
        else:
            mixer = (ops().attention_block, (*norms, m.qkv_proj.weight, m.o_proj.weight, m.q_norm.weight,
                                             m.k_norm.weight, m.q_norm.eps, m.rotary.rotary_dim, m.rotary.theta,
                                             m.d ** -0.5))
        _LAYER_ARGS[layer] = (*mixer, _moe_args(layer.ffn) if hasattr(layer.ffn, "router") else None)
    return _LAYER_ARGS[layer]
