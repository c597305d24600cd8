"""Saves a HybridModel as a Hugging Face Qwen3-Next checkpoint directory (the layout the loader reads).

The HF tensors are recovered by inverting the loader's own recipes (weights/hf_layout.py), so the
saved layout cannot drift from what `load_model` expects: each recipe is run once on tensors holding
their own element indices, which yields where every fused element comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ..layers.model import HybridModel
from ..weights.hf_layout import Recipe, hf_recipes
from .data import EOS, IM_END, SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _invert(recipe: Recipe, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    """The source tensors that `recipe.combine` fuses into `fused`."""
    sizes = [torch.Size(shape).numel() for _, shape in recipe.sources]
    ids = torch.arange(sum(sizes)).split(sizes)
    where = recipe.combine([i.view(shape) for i, (_, shape) in zip(ids, recipe.sources)]).flatten()
    if not torch.equal(where.sort().values, torch.arange(sum(sizes))):
        raise ValueError(f"recipe for {recipe.sources[0][0]} is not a permutation of its sources")
    flat = torch.empty(sum(sizes), dtype=fused.dtype)
    flat[where] = fused.detach().flatten().cpu()
    return {name: part.view(shape).clone() for (name, shape), part in zip(recipe.sources, flat.split(sizes))}


def hf_state_dict(model: HybridModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    mtp_layers = len(model.mtp.layers) if model.mtp is not None else 0
    out: dict[str, torch.Tensor] = {}
    # no fused-expert names given: experts are written one matrix each, the layout of the Hub checkpoints
    for param, recipe in hf_recipes(model.cfg, set(), mtp_layers).items():
        out.update({k: v.to(dtype).contiguous() for k, v in _invert(recipe, params[param]).items()})
    return out


def save_checkpoint(path: Path, model: HybridModel, config: dict, tok: Tokenizer, dtype: torch.dtype) -> None:
    """config.json, model.safetensors (weights in `dtype`), tokenizer and generation config."""
    path.mkdir(parents=True, exist_ok=True)
    eos_ids = [tok.token_to_id(EOS), tok.token_to_id(IM_END)]
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_state_dict(model, dtype), str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    tok_cfg = dict(tokenizer_class="PreTrainedTokenizerFast", added_tokens_decoder=added, bos_token=None,
                   eos_token=EOS, pad_token=EOS, add_prefix_space=False, clean_up_tokenization_spaces=False,
                   model_max_length=config["max_position_embeddings"], chat_template=CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = dict(bos_token_id=None, eos_token_id=eos_ids, pad_token_id=eos_ids[0], do_sample=False)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
