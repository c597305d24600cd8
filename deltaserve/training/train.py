"""Trains the default model through the engine's own forward: python -m deltaserve.training.train --out DIR.

Each step runs HybridModel.forward on B full-length segments (start_pos 0) with a fresh HybridCache,
so no autograd history crosses steps. Loss = next-token CE + mtp_weight * next-next-token CE of the
MTP head + aux_weight * MoE load-balancing loss (Switch-Transformer form, read off the routers with
forward hooks). Seeded: same seed, same machine and threads -> same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.state_cache import HybridCache
from ..config import ModelConfig
from ..forward_batch import Segment, build_batch
from ..layers.feed_forward import SparseMoE
from ..layers.model import HybridModel
from .data import EOS, IM_END, sample_windows, source_files, token_stream, train_tokenizer
from .export import save_checkpoint
from .model_init import count_params, hf_config, init_weights


class RouterLoss:
    """Collects every MoE router's logits during a forward; `pop()` returns the mean balancing loss."""

    def __init__(self, model: HybridModel):
        self.logits: list[tuple[torch.Tensor, int]] = []
        for m in model.modules():
            if isinstance(m, SparseMoE):
                m.router.register_forward_hook(lambda mod, inp, out, k=m.top_k: self.logits.append((out, k)))

    def pop(self) -> torch.Tensor:
        """E * sum_e (fraction of routed slots on e) * (mean router prob of e): 1 when balanced."""
        losses = []
        for logits, k in self.logits:
            probs = logits.float().softmax(-1)  # [T, E]
            chosen = F.one_hot(probs.topk(k, dim=-1).indices, probs.shape[-1]).sum(1).float()  # [T, E]
            losses.append(probs.shape[-1] * (chosen.mean(0) / k * probs.mean(0)).sum())
        self.logits.clear()
        return torch.stack(losses).mean()


def step_losses(model: HybridModel, windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """windows [B, L+2]: inputs are the first L tokens; returns (main CE, MTP CE), averaged over B*L."""
    b, n = windows.shape
    length = n - 2
    inputs, nxt, nxt2 = windows[:, :length], windows[:, 1:length + 1], windows[:, 2:]
    cache = HybridCache(model.cfg, b, length, torch.float32, device)  # fresh: states start at zero
    batch = build_batch([Segment(row.tolist(), 0, slot, 0) for slot, row in enumerate(inputs)], b, device,
                        block_table=cache.block_table)
    hidden = model(batch, cache)  # [B*L, D], rows in segment order = inputs flattened
    main = F.cross_entropy(model.logits(hidden), nxt.flatten().to(device))
    cfg = model.cfg
    kv = tuple(torch.zeros(b, length, cfg.num_kv_heads, cfg.head_dim, device=device) for _ in range(2))
    mtp_hidden = model.mtp(hidden, model.embed(nxt.flatten().to(device)), batch, kv)
    mtp = F.cross_entropy(model.logits(mtp_hidden), nxt2.flatten().to(device))
    return main, mtp


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="segments per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--aux-weight", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.time()
    train_files, held_out = source_files()
    tok = train_tokenizer(train_files, args.vocab)
    stream = token_stream(tok, train_files)
    config = hf_config(tok.get_vocab_size(), 4096, [tok.token_to_id(EOS), tok.token_to_id(IM_END)])
    cfg = ModelConfig.from_dict(config)
    model = HybridModel(cfg, mtp_layers=1).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    init_weights(model, cfg, gen)
    counts = count_params(model)
    print(f"{len(train_files)} training files ({len(stream)} tokens), {len(held_out)} held out; "
          f"params {counts}; setup {time.time() - t0:.0f}s", flush=True)

    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    router = RouterLoss(model)
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        windows = sample_windows(stream, args.batch, args.seq_len + 2, gen)
        main_loss, mtp_loss = step_losses(model, windows, device)
        aux = router.pop()
        loss = main_loss + args.mtp_weight * mtp_loss + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            tok_s = (step + 1) * args.batch * args.seq_len / elapsed
            print(f"step {step} loss {main_loss.item():.3f} mtp {mtp_loss.item():.3f} aux {aux.item():.3f} "
                  f"gnorm {grad_norm:.2f} lr {opt.param_groups[0]['lr']:.2e} {tok_s:.0f} tok/s {elapsed:.0f}s", flush=True)

    save_checkpoint(args.out, model.cpu(), config, tok, getattr(torch, args.save_dtype))
    summary = dict(steps=args.steps, tokens_seen=args.steps * args.batch * args.seq_len,
                   train_seconds=round(time.time() - t_train), total_seconds=round(time.time() - t0),
                   params=counts, args={k: str(v) for k, v in vars(args).items()},
                   held_out=[str(p) for p in held_out])
    print(f"saved {args.out}\n{json.dumps(summary, indent=2)}", flush=True)


if __name__ == "__main__":
    main()
