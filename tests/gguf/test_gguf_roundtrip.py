"""The same tiny model from HF safetensors and from its GGUF export: equal weights, equal logits."""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM
from deltaserve.weights.gguf_export import export_gguf
from deltaserve.weights.loader import load_model
from tiny_models import ARCHS, dense_state_dict, save_hf_model

PROMPTS = [[5, 17, 200, 3, 99, 42, 7, 250, 1, 128, 64, 31], [9, 8, 7]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_model(hf_path, gguf_path, atol: float = 0.0) -> None:
    """Same config and the same parameter values (to `atol`) whether loaded from safetensors or from GGUF (each
    keeps its weight matrices in the dtype its file stores them in)."""
    m_hf, cfg_hf = load_model(hf_path)
    m_gg, cfg_gg = load_model(gguf_path)
    assert cfg_gg == cfg_hf
    hf, gg = dense_state_dict(m_hf), dense_state_dict(m_gg)
    assert gg.keys() == hf.keys()
    for name in hf:
        torch.testing.assert_close(gg[name], hf[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_gives_equal_logits(arch, tiny_dirs, f32_ggufs):
    assert_same_model(tiny_dirs[arch], f32_ggufs[arch])
    ref = LLM(tiny_dirs[arch], dtype="float32", max_num_seqs=2, max_model_len=64).score(PROMPTS)
    out = LLM(f32_ggufs[arch], dtype="float32", max_num_seqs=2, max_model_len=64).score(PROMPTS)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_export_of_f16_checkpoint_gives_equal_logits(arch, tmp_path):
    """f16 weights pass through GGUF F16 unchanged; F32 tensors (norms stored +1, -exp(A_log)) round to 1 ulp."""
    hf = save_hf_model(arch, tmp_path / "hf", seed=1, dtype=torch.float16)
    gguf = export_gguf(hf, tmp_path / "m.gguf", "f16")
    assert_same_model(hf, gguf, atol=1e-6)
    ref = LLM(hf, dtype="float32", max_num_seqs=2, max_model_len=64).score(PROMPTS)
    out = LLM(gguf, dtype="float32", max_num_seqs=2, max_model_len=64).score(PROMPTS)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-5


def test_bf16_export_of_bf16_checkpoint_keeps_weights(tmp_path):
    hf = save_hf_model("qwen3_5_moe", tmp_path / "hf", seed=2, dtype=torch.bfloat16)
    assert_same_model(hf, export_gguf(hf, tmp_path / "m.gguf", "bf16"), atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_mtp_layers_travel_as_nextn_blocks(arch, mtp_dirs, tmp_path):
    gguf = export_gguf(mtp_dirs[arch], tmp_path / "m.gguf", "f32")
    assert_same_model(mtp_dirs[arch], gguf, atol=1e-6)  # random MTP norms: (w + 1) - 1 rounds in float32
    model, _ = load_model(gguf)
    assert model.mtp is not None and len(model.mtp.layers) == 1
    no_mtp = export_gguf(mtp_dirs[arch], tmp_path / "no_mtp.gguf", "f32", mtp=False)
    assert load_model(no_mtp)[0].mtp is None


def test_qwen3next_export_drops_mtp_like_the_converter(mtp_dirs, tmp_path):
    model, _ = load_model(export_gguf(mtp_dirs["qwen3_next"], tmp_path / "m.gguf", "f32"))
    reference, _ = load_model(mtp_dirs["qwen3_next"])
    assert model.mtp is None
    ref = {k: v for k, v in reference.state_dict().items() if not k.startswith("mtp.")}
    assert model.state_dict().keys() == ref.keys()


def test_non_periodic_layer_types_and_tied_embeddings(tmp_path):
    """Layer kinds beyond full_attention_interval go through recurrent_layers flags; tied heads have no output."""
    kinds = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    hf = save_hf_model("qwen3_5", tmp_path / "hf", num_hidden_layers=4, layer_types=kinds, tie_word_embeddings=True)
    gguf = export_gguf(hf, tmp_path / "m.gguf", "f32")
    assert_same_model(hf, gguf)
    model, cfg = load_model(gguf)
    assert cfg.layer_types == tuple(kinds) and cfg.tie_word_embeddings and model.lm_head is None
