"""Broken GGUF files fail on open with the tensor or key named, expected versus found."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf_edit import rewrite_gguf

from deltaserve.weights.loader import load_model, open_checkpoint
from deltaserve.weights.safetensors_dir import CheckpointError


@pytest.fixture()
def good(f32_ggufs, tmp_path):
    """A private copy of the qwen3_5 f32 export (tests below damage it)."""
    dst = tmp_path / "m.gguf"
    dst.write_bytes(f32_ggufs["qwen3_5"].read_bytes())
    return dst


def test_truncated_data_names_the_tensor(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=r"tensor '[\w.]+' \(F32, shape \[\d+(, \d+)*\]\) needs bytes up to \d+, "
                                              r"but the file has only \d+ bytes \(truncated file\?\)"):
        open_checkpoint(good)


@pytest.mark.parametrize("keep", [0, 3, 20, 200, 5000])
def test_truncated_or_garbled_header(good, keep):
    good.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="not a readable GGUF file|empty"):
        open_checkpoint(good)


def test_bad_magic(good):
    good.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(CheckpointError, match="not a readable GGUF file.*magic"):
        open_checkpoint(good)


def test_unknown_type_id_names_the_tensor(good):
    reader = GGUFReader(good, "r+")
    reader.tensors[5].field.parts[4][0] = 99  # the tensor's GGML type
    reader.data.flush()
    name = reader.tensors[5].name
    del reader
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has unknown GGML type id 99"):
        open_checkpoint(good)


def test_nan_data_names_the_tensor(good):
    reader = GGUFReader(good, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.2.ssm_out.weight")
    t.data.reshape(-1)[7] = np.nan
    reader.data.flush()
    del reader, t
    with pytest.raises(CheckpointError, match=r"'blk.2.ssm_out.weight' \(F32\) holds NaN or Inf"):
        load_model(good)


def test_unsupported_tensor_type_names_itself(good, tmp_path):
    bad = rewrite_gguf(good, tmp_path / "bad.gguf", add_tensors={"blk.0.extra.weight": np.zeros((4, 8), np.int8)})
    with pytest.raises(CheckpointError, match="tensor 'blk.0.extra.weight' has type I8, which deltaserve cannot "
                                              "dequantize \\(supported: .*Q4_K.*\\)"):
        open_checkpoint(bad)


@pytest.mark.parametrize("change, message", [
    (dict(drop_keys=("qwen35.ssm.group_count",)), "metadata key 'qwen35.ssm.group_count' is missing"),
    (dict(set_keys={"qwen35.block_count": "eight"}), "key 'qwen35.block_count' should be int, found str 'eight'"),
    (dict(set_keys={"general.architecture": "llama"}), "architecture 'llama' is not supported; deltaserve reads "
                                                        "qwen3next, qwen35, qwen35moe"),
    (dict(set_keys={"qwen35.embedding_length": 128}),
     r"token_embd.weight \[256, 64\] gives model.embed_tokens.weight of shape \[256, 64\], but the metadata "
     r"implies \[256, 128\]"),
    (dict(set_keys={"qwen35.full_attention_interval": 2}), r"blk.1 holds gated-deltanet tensors, but the metadata "
                                                           r"\(full_attention_interval / recurrent_layers\) makes "
                                                           r"it a full_attention layer"),
    (dict(drop_tensors=("blk.6.ssm_beta.weight",)), r"blk.6.ssm_beta.weight missing \(needed for "
                                                    r"model.layers.6.linear_attn.in_proj_b.weight\)"),
    (dict(add_tensors={"blk.3.ffn_gate_inp.weight": np.zeros((8, 64), np.float32)}),
     "unexpected tensors blk.3.ffn_gate_inp.weight"),
    (dict(set_keys={"qwen35.rope.scaling.type": "yarn"}), "rope_type 'yarn' is not supported"),
])
def test_mismatched_metadata_and_tensors(good, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(rewrite_gguf(good, tmp_path / "bad.gguf", **change))
