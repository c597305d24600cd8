"""The exported files themselves, read with gguf-py alone: names, keys, shapes and values as llama.cpp's
converter writes them. Index arithmetic here is written out independently of deltaserve's conventions module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file

from deltaserve.weights.gguf_export import export_gguf


def read(path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: (type, ne, float32 tensor)}) straight from the file."""
    r = GGUFReader(path)
    keys = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, [int(d) for d in t.shape],
                        torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(
                            [int(d) for d in reversed(t.shape)])) for t in r.tensors}
    return keys, tensors


def tiled(hk: int, r: int) -> list[int]:
    """GGUF position -> HF V head: qwen35 files list head r of every key group before head r + 1."""
    return [k * r + j for j in range(r) for k in range(hk)]


def rows(t: torch.Tensor, heads: list[int], width: int, dim: int = 0) -> torch.Tensor:
    idx = torch.tensor([h * width + i for h in heads for i in range(width)])
    return t.index_select(dim, idx)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_qwen35_files(arch, mtp_dirs, tmp_path):
    hf = load_file(mtp_dirs[arch] / "model.safetensors")
    keys, t = read(export_gguf(mtp_dirs[arch], tmp_path / "m.gguf", "q8_0"))
    a = "qwen35" if arch == "qwen3_5" else "qwen35moe"
    assert keys["general.architecture"] == a
    expect = {"block_count": 9, "nextn_predict_layers": 1, "embedding_length": 64, "attention.head_count": 4,
              "attention.head_count_kv": 2, "attention.key_length": 16, "attention.value_length": 16,
              "rope.dimension_count": 4, "ssm.conv_kernel": 4, "ssm.state_size": 16, "ssm.group_count": 2,
              "ssm.time_step_rank": 6, "ssm.inner_size": 96, "full_attention_interval": 4,
              "rope.dimension_sections": [11, 11, 10, 0]}
    if arch == "qwen3_5_moe":
        expect.update({"expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 32,
                       "expert_shared_feed_forward_length": 48})
    assert {k: keys[f"{a}.{k}"] for k in expect} == expect
    assert keys[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    L, p = "model.layers.0.linear_attn.", tiled(2, 3)
    assert t["blk.0.ssm_conv1d.weight"][:2] == (Q.F32, [4, 160])  # ne: kernel innermost, channels outer
    assert t["blk.0.attn_qkv.weight"][0] == Q.Q8_0
    torch.testing.assert_close(t["blk.0.attn_norm.weight"][2], hf["model.layers.0.input_layernorm.weight"] + 1)
    torch.testing.assert_close(t["blk.0.ssm_norm.weight"][2], hf[L + "norm.weight"])  # GDN norm: no +1
    torch.testing.assert_close(t["blk.0.ssm_a"][2], -torch.exp(hf[L + "A_log"])[p])
    torch.testing.assert_close(t["blk.0.ssm_dt.bias"][2], hf[L + "dt_bias"][p])
    conv = hf[L + "conv1d.weight"][:, 0]
    torch.testing.assert_close(t["blk.0.ssm_conv1d.weight"][2], torch.cat([conv[:64], rows(conv[64:], p, 16)]))
    q8 = dict(atol=2e-3, rtol=0)  # Q8_0 error <= max|w| of a 32-block / 254 (|w| < 0.5 here)
    qkv = hf[L + "in_proj_qkv.weight"]
    torch.testing.assert_close(t["blk.0.attn_qkv.weight"][2], torch.cat([qkv[:64], rows(qkv[64:], p, 16)]), **q8)
    torch.testing.assert_close(t["blk.0.attn_gate.weight"][2], rows(hf[L + "in_proj_z.weight"], p, 16), **q8)
    torch.testing.assert_close(t["blk.0.ssm_beta.weight"][2], hf[L + "in_proj_b.weight"][p], **q8)
    torch.testing.assert_close(t["blk.0.ssm_alpha.weight"][2], hf[L + "in_proj_a.weight"][p], **q8)
    torch.testing.assert_close(t["blk.0.ssm_out.weight"][2], rows(hf[L + "out_proj.weight"], p, 16, dim=1), **q8)
    torch.testing.assert_close(t["blk.3.attn_q.weight"][2], hf["model.layers.3.self_attn.q_proj.weight"], **q8)
    torch.testing.assert_close(t["blk.3.attn_q_norm.weight"][2], hf["model.layers.3.self_attn.q_norm.weight"] + 1)
    if arch == "qwen3_5_moe":
        assert t["blk.1.ffn_gate_exps.weight"][1] == [64, 32, 8]  # ne: {n_embd, n_ff, n_expert}
        assert t["blk.1.ffn_gate_inp.weight"][0] == Q.F32 and t["blk.1.ffn_gate_inp_shexp.weight"][0] == Q.F32
        torch.testing.assert_close(t["blk.1.ffn_down_exps.weight"][2][5],
                                   hf["model.layers.1.mlp.experts.5.down_proj.weight"], **q8)
    # MTP: block 8 = mtp.layers.0, with the nextn extras (norms +1)
    torch.testing.assert_close(t["blk.8.nextn.eh_proj.weight"][2], hf["mtp.fc.weight"], **q8)
    torch.testing.assert_close(t["blk.8.nextn.enorm.weight"][2], hf["mtp.pre_fc_norm_embedding.weight"] + 1)
    torch.testing.assert_close(t["blk.8.nextn.hnorm.weight"][2], hf["mtp.pre_fc_norm_hidden.weight"] + 1)
    torch.testing.assert_close(t["blk.8.nextn.shared_head_norm.weight"][2], hf["mtp.norm.weight"] + 1)
    torch.testing.assert_close(t["blk.8.attn_k.weight"][2], hf["mtp.layers.0.self_attn.k_proj.weight"], **q8)


def test_qwen3next_file(tiny_dirs, f32_ggufs):
    hf = load_file(tiny_dirs["qwen3_next"] / "model.safetensors")
    keys, t = read(f32_ggufs["qwen3_next"])
    assert keys["general.architecture"] == "qwen3next" and keys["qwen3next.block_count"] == 8
    assert "blk.0.ssm_in.weight" not in t and "blk.8.attn_norm.weight" not in t
    L = "model.layers.0.linear_attn."
    qkvz = hf[L + "in_proj_qkvz.weight"].reshape(2, 2 * 16 + 2 * 32, 64)  # per key head: q16 k16 v32 z32
    want_qkv = torch.cat([qkvz[:, :16].reshape(-1, 64), qkvz[:, 16:32].reshape(-1, 64), qkvz[:, 32:64].reshape(-1, 64)])
    torch.testing.assert_close(t["blk.0.attn_qkv.weight"][2], want_qkv)
    torch.testing.assert_close(t["blk.0.attn_gate.weight"][2], qkvz[:, 64:].reshape(-1, 64))
    torch.testing.assert_close(t["blk.0.ssm_ba.weight"][2], hf[L + "in_proj_ba.weight"])  # kept packed
    torch.testing.assert_close(t["blk.0.ssm_a"][2], -torch.exp(hf[L + "A_log"]))  # no V reorder for qwen3next
    torch.testing.assert_close(t["blk.0.ssm_out.weight"][2], hf[L + "out_proj.weight"])
    torch.testing.assert_close(t["blk.1.ffn_up_exps.weight"][2][3], hf["model.layers.1.mlp.experts.3.up_proj.weight"])
    torch.testing.assert_close(t["output_norm.weight"][2], hf["model.norm.weight"] + 1)
