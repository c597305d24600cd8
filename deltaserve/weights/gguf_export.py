"""HF checkpoint directory -> GGUF file, written the way llama.cpp's convert_hf_to_gguf.py writes it.

    python -m deltaserve.weights.gguf_export MODEL_DIR [-o OUT.gguf] [--outtype q8_0] [--no-mtp]

Metadata keys, tensor names and conventions follow the converter (see gguf_conventions.py), so
llama.cpp can read the files and deltaserve reads llama.cpp's. Beyond the converter's f32/f16/bf16/q8_0,
the legacy quants (q4_0 ... q5_1) and two K-quants (q4_k, q6_k) are written directly, applied uniformly
(llama-quantize's mixes such as Q4_K_M are not reproduced). Tensors are written one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import (GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFType, GGUFWriter, LlamaFileType,
                  quants)
from tqdm import tqdm

from ..config import ModelConfig
from .gguf_conventions import ARCH_OF_FAMILY
from .gguf_export_tensors import plan_export, storage_type
from .gguf_vocab import write_vocab
from .kquants import K_QUANTIZERS, quantize_k
from .safetensors_dir import SafetensorsDir

log = logging.getLogger(__name__)
Q, F = GGMLQuantizationType, LlamaFileType
OUTTYPES = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    "q6_k": (Q.Q6_K, F.MOSTLY_Q6_K), "q4_k": (Q.Q4_K, F.MOSTLY_Q4_K_S),
}
QWEN35_MROPE_SECTIONS = [11, 11, 10, 0]  # what the converter writes when the config names none


def _write_params(w: GGUFWriter, cfg: ModelConfig, text: dict, n_mtp: int, name: str, ftype: LlamaFileType) -> None:
    """The `{arch}.*` hyperparameters, key by key as the converter sets them for these architectures."""
    w.add_type(GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.num_layers + n_mtp)  # nextn blocks come after the trunk
    if ctx := text.get("max_position_embeddings"):
        w.add_context_length(ctx)
    w.add_embedding_length(cfg.hidden_size)
    if text.get("intermediate_size"):
        w.add_feed_forward_length(text["intermediate_size"])
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        if not cfg.norm_topk_prob:  # the converter never writes it: llama.cpp renormalises top-k for these archs
            w.add_expert_weights_norm(False)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_state_size(cfg.k_head_dim)
    w.add_ssm_group_count(cfg.num_k_heads)
    w.add_ssm_time_step_rank(cfg.num_v_heads)
    w.add_ssm_inner_size(cfg.v_head_dim * cfg.num_v_heads)
    interval = text.get("full_attention_interval", 4)
    periodic = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(cfg.num_layers)]
    if list(cfg.layer_types) == periodic:
        w.add_full_attention_interval(interval)
    else:  # llama.cpp's explicit per-block flags (nextn blocks attend)
        w.add_array(f"{w.arch}.attention.recurrent_layers",
                    [t == "linear_attention" for t in cfg.layer_types] + [False] * n_mtp)
    w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.family != "qwen3_next":
        sections = list((text.get("rope_parameters") or {}).get("mrope_section") or QWEN35_MROPE_SECTIONS)
        w.add_rope_dimension_sections((sections + [0] * 4)[:4])
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_quantization_version(GGML_QUANT_VERSION)


def _encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    arr = t.detach().float().contiguous().numpy()
    return quantize_k(arr, qtype) if qtype in K_QUANTIZERS else quants.quantize(arr, qtype)


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", mtp: bool = True,
                progress: bool | None = None) -> Path:
    """Writes `out` from the HF checkpoint in `model_dir`; returns its path."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    qtype, ftype = OUTTYPES[outtype]
    ckpt, cfg = SafetensorsDir(model_dir), ModelConfig.from_dir(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    text = raw.get("text_config", raw)
    n_mtp = len({n.split(".")[2] for n in ckpt.names() if n.startswith("mtp.layers.")})
    n_mtp = n_mtp if mtp and cfg.family != "qwen3_next" else 0  # the converter drops qwen3next's MTP
    planned = plan_export(ckpt, cfg, n_mtp)

    w = GGUFWriter(None, ARCH_OF_FAMILY[cfg.family])
    _write_params(w, cfg, text, n_mtp, model_dir.name, ftype)
    if not write_vocab(w, model_dir, cfg.vocab_size):
        log.warning("%s: no tokenizer.json; the GGUF will carry no tokenizer", model_dir)
    types = [storage_type(p.name, p.shape, qtype) for p in planned]
    log.info("%s: %s", out.name, ", ".join(f"{t.name} x{n}" for t, n in Counter(types).most_common()))
    sizes = [int(np.prod(p.shape)) // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1] for p, t in zip(planned, types)]
    for p, t, n in zip(planned, types, sizes):
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), n, raw_dtype=t)
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    show = sum(sizes) >= 1 << 30 if progress is None else progress
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not show) as bar:
        for p, t in zip(planned, types):
            tensor = p.make()
            if tuple(tensor.shape) != p.shape:
                raise ValueError(f"{model_dir}: '{p.name}' came out {list(tensor.shape)}, header says {list(p.shape)}")
            data = _encode(tensor, t)
            w.write_tensor_data(data)
            bar.update(data.nbytes)
    w.close()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltaserve convert",
                                description="Convert a Hugging Face checkpoint directory to a GGUF file "
                                            "(llama.cpp's conventions: qwen3next, qwen35, qwen35moe).")
    p.add_argument("model_dir", type=Path, help="HF checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("-o", "--outfile", type=Path, help="output .gguf (default: MODEL_DIR/<name>-<OUTTYPE>.gguf)")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                   help="type of the weight matrices; vectors, norms, routers and convs stay f32 (default: f16)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP (nextn) layers")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: for outputs of 1 GiB or more)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every step
    out = args.outfile or args.model_dir / f"{args.model_dir.resolve().name}-{args.outtype.upper()}.gguf"
    try:
        path = export_gguf(args.model_dir, out, args.outtype, mtp=not args.no_mtp, progress=args.progress)
    except (ValueError, OSError) as e:
        print(f"deltaserve convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
