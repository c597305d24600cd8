"""Qwen's block-FP8 checkpoints (issue 16), on the CPU: the fixture writer, reading and fusing (a Qwen3-Next in_proj
fuses FP8 qkvz rows with bf16 ba rows), errors, and whole models against the float32 model of the same
dequantized weights: dequantized at load (the CPU path) and as PlanarWeights running the torch reference (what
the CUDA kernels compute; those: tests/cuda/test_quantized.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve import LLMEngine
from deltaserve.config import ModelConfig
from deltaserve.kernels.gpu_quant import PlanarWeight
from deltaserve.weights.fp8 import combine_fp8, dequantize_fp8, quantize_fp8, write_fp8_checkpoint
from deltaserve.weights.hf_layout import _deinterleave_qwen3_next
from deltaserve.weights.loader import load_model
from deltaserve.weights.quantize import quantize_planar
from deltaserve.weights.safetensors_dir import CheckpointError
from drive import prompt_logits
from tiny_models import ARCHS, tiny_config


@pytest.mark.parametrize("shape", [(256, 384), (100, 70), (3, 256, 128)], ids=str)
def test_block_quantization_error_and_layout(shape):
    w = torch.randn(shape) * torch.rand(shape[:-1])[..., None]  # rows of different ranges
    codes, scale = quantize_fp8(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape[-2:] == (-(-shape[-2] // 128), -(-shape[-1] // 128))
    back = dequantize_fp8(codes, scale)
    blocks = (w - back).abs() / scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :shape[-2], :shape[-1]]
    assert blocks.max() <= 448 * 2 ** -4  # e4m3: 3 mantissa bits, half a step of the largest binade (256..448)


@pytest.mark.parametrize("fmt, rel", [("fp8", 0.04), ("q8_0", 0.01), ("q4_k", 0.12), ("q6_k", 0.03)])
def test_quantize_planar(fmt, rel):
    w = torch.randn(3, 256, 512)
    p = quantize_planar(w, fmt, torch.float32)
    back = p.dequantize()
    assert float((back - w).norm() / w.norm()) <= rel
    assert torch.equal(p.expert(1).dequantize(), back[1])


def test_fp8_rows_fuse_with_plain_rows_as_the_recipe_moves_them():
    cfg = ModelConfig.from_dict({**tiny_config("qwen3_next", hidden_size=128, linear_num_key_heads=2,
                                               linear_key_head_dim=128, linear_value_head_dim=128),
                                 "model_type": "qwen3_next"})
    qkvz = torch.randn(cfg.conv_dim + cfg.num_v_heads * cfg.v_head_dim, 128)
    ba = torch.randn(2 * cfg.num_v_heads, 128).bfloat16()
    build = _deinterleave_qwen3_next(cfg)
    fp8 = quantize_fp8(qkvz)
    fused = combine_fp8(build, [fp8, ba], torch.float32)
    assert [s.fmt for s in fused.segments] == ["fp8", "plain"]
    assert fused.segments[0].row_block == 128  # heads of 128 rows: the file's blocks move whole
    assert torch.equal(fused.dequantize(), build([dequantize_fp8(*fp8), ba.float()]))
    odd = combine_fp8(lambda ts: ts[0][torch.arange(ts[0].shape[0]).roll(1)], [fp8], torch.float32)
    assert odd.segments[0].row_block == 1 and torch.equal(odd.dequantize(), dequantize_fp8(*fp8).roll(1, 0))


@pytest.fixture(scope="module")
def fp8_dirs(tiny_dirs, tmp_path_factory):
    """{arch: (FP8 copy of the tiny checkpoint, float32 checkpoint of its dequantized weights)}."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"fp8_{arch}")
        fp8 = write_fp8_checkpoint(tiny_dirs[arch], root / "fp8")
        tensors = load_file(str(fp8 / "model.safetensors"))
        plain = {n: (dequantize_fp8(t, tensors[n + "_scale_inv"]) if n + "_scale_inv" in tensors else t.float())
                 for n, t in tensors.items() if not n.endswith("_scale_inv")}
        ref = root / "ref"
        ref.mkdir()
        save_file(plain, str(ref / "model.safetensors"))
        cfg = json.loads((fp8 / "config.json").read_text())
        del cfg["quantization_config"]
        (ref / "config.json").write_text(json.dumps(cfg))
        out[arch] = fp8, ref
    return out


PROMPTS = [list(range(3, 43)), [7, 9, 11], list(range(100, 160, 3))]


def score(model, cfg) -> list[torch.Tensor]:
    return prompt_logits(LLMEngine(model, cfg, None, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64),
                         PROMPTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_checkpoint_equals_its_dequantized_weights(fp8_dirs, arch):
    fp8, ref = fp8_dirs[arch]
    reference = score(*load_model(ref))
    for got, want in zip(score(*load_model(fp8)), reference):  # CPU: dequantized at load
        assert torch.equal(got, want)
    planar, cfg = load_model(fp8, planar=True)
    mixer = planar.layers[0].mixer
    assert isinstance(mixer.in_proj.weight, PlanarWeight) and isinstance(planar.head_weight, torch.Tensor)
    assert [s.fmt for s in mixer.in_proj.weight.segments] == ["fp8", "plain"]  # b and a rows stay bf16
    if arch != "qwen3_5":
        assert planar.layers[0].ffn.experts_down.fmt == "fp8"
    for got, want in zip(score(planar, cfg), reference):
        assert float((got - want).norm() / want.norm()) <= 1e-4


def test_fp8_checkpoint_errors(fp8_dirs, tmp_path):
    fp8, _ = fp8_dirs["qwen3_5"]
    cfg = json.loads((fp8 / "config.json").read_text())
    tensors = load_file(str(fp8 / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    cases = [
        ({**cfg, "quantization_config": {**cfg["quantization_config"], "weight_block_size": [64, 64]}}, tensors,
         "weight_block_size [128, 128]"),
        ({**cfg, "quantization_config": {"quant_method": "gptq"}}, tensors, "quantization method 'gptq'"),
        ({k: v for k, v in cfg.items() if k != "quantization_config"}, tensors, "is FP8 but config.json has no fp8"),
        (cfg, {**tensors, "model.layers.0.mlp.gate.weight_scale_inv": torch.ones(1, 1)},
         "'model.layers.0.mlp.gate.weight_scale_inv' scales"),
    ]
    for config, ts, message in cases:
        (bad / "config.json").write_text(json.dumps(config))
        save_file(ts, str(bad / "model.safetensors"))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_model(bad)
