"""Checkpoint layouts the loader accepts, and the clear errors for the ones it refuses."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve import LLM
from deltaserve.cache.state_cache import CacheTooLarge
from deltaserve.config import ConfigError
from deltaserve.weights.safetensors_dir import CheckpointError
from tiny_models import build_hf_model

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("q35")
    build_hf_model("qwen3_5", seed=3).save_pretrained(path)
    return path, LLM(path, dtype="float32", max_num_seqs=2, max_model_len=64).score([PROMPT])[0]


def rewrite(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir(exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if edit_tensors:
        tensors = edit_tensors(tensors)
    if edit_config:
        cfg = edit_config(cfg)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_sharded_checkpoint_with_index(base, tmp_path):
    path, ref = base
    build_hf_model("qwen3_5", seed=3).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(LLM(tmp_path, dtype="float32", max_model_len=64).score([PROMPT])[0], ref)


def test_conditional_generation_layout_with_vision_and_mtp(base, tmp_path):
    """Real Qwen3.5 checkpoints: weights under model.language_model.*, a vision tower, mtp.* weights."""
    path, ref = base

    def edit(t):
        out = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
        out["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
        for k, v in t.items():  # an MTP layer shaped like the attention layer 3
            if k.startswith("model.layers.3."):
                out[k.replace("model.layers.3.", "mtp.layers.0.")] = v.clone()
        d = t["model.norm.weight"].shape[0]
        out["mtp.fc.weight"] = torch.randn(d, 2 * d)
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            out[f"mtp.{n}.weight"] = torch.zeros(d)
        return out

    def config(c):
        return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                "text_config": {**c, "model_type": "qwen3_5_text"}, "vision_config": {}}

    dst = rewrite(path, tmp_path / "vl", edit, config)
    llm = LLM(dst, dtype="float32", max_model_len=64)
    assert llm.engine.runner.model.mtp is not None
    torch.testing.assert_close(llm.score([PROMPT])[0], ref)


def test_bfloat16_weights_keep_float32_state(base, tmp_path):
    path, ref = base
    build_hf_model("qwen3_5", seed=3).to(torch.bfloat16).save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype="auto", max_model_len=64)
    assert llm.engine.runner.model.embed.weight.dtype == torch.bfloat16
    conv, ssm = llm.engine.cache.layer(0)
    assert ssm.dtype == torch.float32 and conv.dtype == torch.bfloat16
    got = llm.score([PROMPT])[0]
    assert float((got - ref).abs().max() / ref.abs().max()) < 5e-2


@pytest.mark.parametrize("edit,match", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.linear_attn.A_log"},
     "missing tensors model.layers.1.linear_attn.A_log"),
    (lambda t: {**t, "model.layers.0.bogus.weight": torch.zeros(2)}, "unexpected tensors model.layers.0.bogus.weight"),
    (lambda t: {**t, "model.layers.3.self_attn.k_proj.weight": torch.zeros(5, 64)},
     r"'model.layers.3.self_attn.k_proj.weight' has shape \[5, 64\], expected \[32, 64\]"),
])
def test_bad_tensors_are_named(base, tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        LLM(rewrite(base[0], tmp_path / "bad", edit_tensors=edit), max_model_len=64)


def test_unknown_architecture(base, tmp_path):
    dst = rewrite(base[0], tmp_path / "llama", edit_config=lambda c: {**c, "architectures": ["LlamaForCausalLM"],
                                                                       "model_type": "llama"})
    with pytest.raises(ConfigError, match="unsupported architecture.*LlamaForCausalLM"):
        LLM(dst)


def test_corrupt_safetensors_file(base, tmp_path):
    dst = rewrite(base[0], tmp_path / "corrupt")
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LLM(dst)


def test_cache_that_cannot_fit_is_refused_up_front(base):
    with pytest.raises(CacheTooLarge, match="lower max_num_seqs, max_model_len or the KV cache size"):
        LLM(base[0], max_num_seqs=4096, max_model_len=1 << 20)


def test_auto_dtype_of_a_gguf_file_follows_the_device():
    """GGUF: float32 activations on the CPU (its kernels take them), bfloat16 on CUDA (quantized weights stay
    quantized there; the products come out in the activations' dtype)."""
    from deltaserve.weights.loader import resolve_dtype
    assert resolve_dtype("m.gguf", "auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("m.gguf", "auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("m.gguf", "float16", torch.device("cuda")) == torch.float16
