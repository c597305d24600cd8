"""Tensor parallelism on weights kept in their stored formats (issue 19 with issues 15 and 16): each rank's GGUF
blocks, FP8 codes or bf16 rows are the rank's slice of the whole matrix (dequantized: bit for bit what sharding the
dequantized matrix gives), nothing is dequantized where the split falls on whole blocks, and TP=2 on a quantized
file runs as TP=1 does up to the activations' int8 rounding."""

from __future__ import annotations

import logging

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from deltaserve import LLMEngine
from deltaserve.kernels.gpu_quant import PlanarWeight
from deltaserve.kernels.quantized import QuantizedWeight, QuantSegment
from deltaserve.parallel.shard import shard_param
from deltaserve.weights.fp8 import write_fp8_checkpoint
from deltaserve.weights.gguf_export import export_gguf
from deltaserve.weights.gguf_file import GGUFFile
from deltaserve.weights.kquants import quantize_k
from deltaserve.weights.loader import load_model, matrix_params
from deltaserve.weights.rows import combine_rows
from drive import prompt_logits
from gguf_edit import random_blocks, rewrite_gguf
from tiny_models import ARCHS, save_hf_model

# widths whose halves are whole 256-blocks, and 4 key heads: Qwen3-Next's V-head regrouping (a column
# permutation of out_proj in GGUF files) then keeps each rank's heads in whole blocks, as at real sizes
DIMS = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=512,
            linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=128,
            num_experts=4, num_experts_per_tok=4, moe_intermediate_size=512, shared_expert_intermediate_size=512)


def k_quant_file(f32, dst):
    """The f32 export with every matrix in Q4_K (down projections and the head in Q6_K), as a Q4_K_M file mixes them."""
    f = GGUFFile(f32)
    retype = {}
    for name in f.tensors:
        a = f.read(name).numpy()
        if a.ndim >= 2 and a.shape[-1] % 256 == 0:
            qtype = Q.Q6_K if "down" in name or name == "output.weight" else Q.Q4_K
            retype[name] = (quantize_k(a, qtype), qtype)
    return rewrite_gguf(f32, dst, retype=retype)


def low_bit_file(f32, dst):
    """The f32 export with its matrices in the CPU's other kept formats, in turn (random blocks: the slices, not the
    values, are what the test checks)."""
    f = GGUFFile(f32)
    qtypes = [Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.MXFP4, Q.IQ4_NL]
    names = [n for n in f.tensors if len(f.shape(n)) >= 2 and f.shape(n)[-1] % 256 == 0]
    retype = {n: (random_blocks(qtypes[i % 5], f.shape(n), seed=i), qtypes[i % 5]) for i, n in enumerate(names)}
    return rewrite_gguf(f32, dst, retype=retype)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"tp_{arch}")
        hf = save_hf_model(arch, d / "hf", seed=2, **DIMS)
        out[arch, "q8_0"] = export_gguf(hf, d / "q8_0.gguf", "q8_0")
        f32 = export_gguf(hf, d / "f32.gguf", "f32")
        out[arch, "k"] = k_quant_file(f32, d / "k.gguf")
        out[arch, "low"] = low_bit_file(f32, d / "low.gguf")
        out[arch, "fp8"] = write_fp8_checkpoint(hf, d / "fp8")
    return out


def dense(w) -> torch.Tensor:
    return w.dequantize().float() if isinstance(w, (QuantizedWeight, PlanarWeight)) else w.float()


# FP8 checkpoints stay FP8 on CUDA only (the CPU dequantizes them at load): their planes, not CPU blocks
@pytest.mark.parametrize("kind,planar", [("q8_0", False), ("k", False), ("low", False), ("q8_0", True), ("k", True),
                                         ("fp8", True)],
                         ids=["q8_0-cpu-blocks", "k-cpu-blocks", "low-bit-cpu-blocks", "q8_0-cuda-planes",
                              "k-cuda-planes", "fp8-cuda-planes"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_holds_its_slice_in_the_stored_format(files, arch, kind, planar, caplog):
    path = files[arch, kind]
    full, cfg = load_model(path, planar=planar)
    whole = {name: dense(w) for name, w in full.state_dict(keep_vars=True).items()}
    whole.update({name: dense(getattr(full.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]))
                  for name in matrix_params(full)})
    stored = QuantizedWeight if not planar else PlanarWeight
    for rank in range(2):
        with caplog.at_level(logging.WARNING, logger="deltaserve.weights.loader"):
            part, _ = load_model(path, planar=planar, tp=(rank, 2))
        assert "split inside the file's blocks" not in caplog.text
        for name in matrix_params(part):
            w = getattr(part.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
            if isinstance(getattr(full.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]), stored):
                assert isinstance(w, stored), name  # kept quantized on the rank too
            assert torch.equal(dense(w), shard_param(name, whole[name], cfg, rank, 2)), name
    assert part.weight_bytes() < 0.6 * full.weight_bytes() + 2 * cfg.vocab_size * cfg.hidden_size * 4


def test_a_split_inside_blocks_reads_that_matrix_as_floats(tiny_dirs, tmp_path, caplog):
    """The tiny fixture's experts are 32 wide: 16 columns a rank cut Q8_0's 32-blocks, so those matrices are read as
    floats (one warning names them) and are still the rank's slice."""
    path = export_gguf(tiny_dirs["qwen3_5_moe"], tmp_path / "q8_0.gguf", "q8_0")
    full, cfg = load_model(path)
    with caplog.at_level(logging.WARNING, logger="deltaserve.weights.loader"):
        part, _ = load_model(path, tp=(1, 2))
    assert "rank 1 of 2:" in caplog.text and "layers.0.ffn.experts_down" in caplog.text
    w = part.layers[0].ffn.experts_down
    assert isinstance(w, torch.Tensor)
    assert torch.equal(w, shard_param("layers.0.ffn.experts_down", dense(full.layers[0].ffn.experts_down), cfg, 1, 2))
    assert isinstance(part.layers[0].ffn.experts_gate_up, QuantizedWeight)  # rows split: still blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_on_a_quantized_file_runs_as_tp1(files, arch):
    kw = dict(max_num_seqs=8, max_model_len=128, max_num_batched_tokens=64)
    one = LLMEngine.from_pretrained(files[arch, "k"], **kw)
    two = LLMEngine.from_pretrained(files[arch, "k"], tensor_parallel_size=2, **kw)
    prompts = [list(range(3, 43)), [7, 9, 11], list(range(100, 160, 3))]
    for got, want in zip(prompt_logits(two, prompts), prompt_logits(one, prompts)):
        # the ranks' partial sums add in another order than one dot product; the int8 rounding of the next
        # layer's activations magnifies that (a wrong slice would be off by O(1))
        assert float((got - want).norm() / want.norm()) <= 3e-2


def test_a_column_permuted_weight_keeps_its_rows_or_fails():
    """weights/rows.py keeps a GGUF column permutation only where nothing moves rows (a rank's rows of such a matrix
    would otherwise be silently the whole matrix)."""
    data = torch.from_numpy(quantize(torch.randn(4, 64).numpy(), Q.Q8_0))
    w = QuantizedWeight((4, 64), [QuantSegment(Q.Q8_0, data)], col_perm=torch.arange(64).flip(0))
    assert combine_rows(lambda ts: ts[0], [w]) is w
    with pytest.raises(ValueError, match="cannot be fused with others or have its rows moved"):
        combine_rows(lambda ts: ts[0][:2], [w])
