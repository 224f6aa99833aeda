"""Medusa-1 training on cached backbone features.

Head k learns the token at t+2+k from the hidden state at t; the loss is ``sum_k 0.8**k * CE_k``
(later heads are less predictable and would otherwise dominate the gradient). By default the heads
share the frozen base ``lm_head``, so only the residual blocks (a few MB) are trained; the blocks
start as the identity, as in the original Medusa, so every head starts out as the base model's
next-token guess rather than as noise. ``token_conditioned`` heads also get the embedding of the
token produced at t (``heads.py``), taken from the cached answer tokens.

``soft_targets`` trains head k at t on the base model's whole distribution of the token at t+2+k
(its logits at row t+1+k, from the cached hidden states and the frozen ``lm_head``) instead of the one
token: the cross-entropy to it differs from KL(base || head) by a constant (the loss Medusa-2 uses
for its backbone, here for the heads). It needs no extra data, only one more projection per step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..heads import MedusaHeads, save_medusa_heads
from .features import IGNORE, Features, load_features
from .metrics import autocast, cumulative, head_ranks, rank_accuracies


@dataclass
class TrainConfig:
    num_heads: int = 5
    num_layers: int = 1
    lr: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 256
    weight_decay: float = 0.0
    head_decay: float = 0.8
    warmup_fraction: float = 0.05
    heldout_fraction: float = 0.05
    shared_lm_head: bool = True
    # "full": softmax over the whole vocabulary. "data": only over the tokens that occur in the
    # training answers (every target is among them): several times cheaper on a CPU. The heads then
    # keep that vocabulary as their token_map (draft vocabulary): they were never trained to rank
    # other tokens, and projecting onto its rows only makes drafting several times cheaper.
    # The held-out loss is over the full vocabulary, held-out ranks over what the heads can draft.
    softmax_vocab: str = "full"
    # With softmax_vocab="data": draft only from the N most frequent answer tokens (None: all of
    # them). The projection onto the draft vocabulary is most of the heads' cost per step and is
    # memory-bound; on the demo model 4096 of 12465 tokens keep head-0 top-1 within 0.002.
    draft_vocab: int | None = None
    # With softmax_vocab="data": keep only the N most frequent answer tokens in the training softmax
    # and leave rarer targets out of the loss (None: all of them). The softmax is most of a training
    # step and the answers' vocabulary grows with the data (12,465 tokens in 324k answer tokens,
    # 28,139 in 2.8M); heads that draft from the 4096 most frequent never rank the rest anyway.
    softmax_size: int | None = None
    token_conditioned: bool = False
    # Token-conditioned heads where head k sees the token just before its target (t+1+k: the
    # bonus token for head 0, the drafted path's tokens for the others) instead of the bonus token.
    path_conditioned: bool = False
    # Learn the base model's distribution of each target token, not only its (greedy) token.
    soft_targets: bool = False
    seed: int = 0
    compute_dtype: str = "bfloat16"


@dataclass
class TrainResult:
    heads: MedusaHeads
    config: TrainConfig
    steps: int
    train_positions: int
    heldout_positions: int
    final_train_loss: float
    heldout_loss: float
    heldout_accuracies: list[list[float]]  # per head, per rank
    loss_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    softmax_size: int = 0

    def summary(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "steps": self.steps,
                "train_positions": self.train_positions, "heldout_positions": self.heldout_positions,
                "final_train_loss": self.final_train_loss, "heldout_loss": self.heldout_loss,
                "heldout_topk": cumulative(self.heldout_accuracies), "softmax_size": self.softmax_size,
                "seconds": self.seconds}


def medusa_loss(logits: torch.Tensor, targets: torch.Tensor, head_decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """``sum_k head_decay**k * CE(logits[k], targets[:, k])`` and per-head top-1 accuracy.

    One cross-entropy over all heads at once: per-head slicing of ``[K, B, V]`` logits would make
    autograd zero-fill a full-size gradient per head, which costs more than the matmuls on a CPU.
    """
    k_heads, batch, vocab = logits.shape
    tgt = targets.t()
    ce = F.cross_entropy(logits.reshape(-1, vocab).float(), tgt.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view(k_heads, batch)
    return _decayed_mean(ce, logits, tgt, head_decay)


def soft_medusa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                     head_decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """``sum_k head_decay**k * CE(softmax(teacher_logits[k]), logits[k])`` over the rows where
    ``targets[:, k]`` is a real token, and per-head top-1 accuracy against ``targets``.

    ``teacher_logits`` ``[K, B, V]``: the base model's logits for the token each head predicts.
    """
    tgt = targets.t()
    probs = torch.softmax(teacher_logits.float(), -1)
    ce = -(probs * torch.log_softmax(logits.float(), -1)).sum(-1) * (tgt != IGNORE)
    return _decayed_mean(ce, logits, tgt, head_decay)


def _decayed_mean(ce: torch.Tensor, logits: torch.Tensor, tgt: torch.Tensor,
                  head_decay: float) -> tuple[torch.Tensor, list[float]]:
    """Per-head mean of ``ce`` ``[K, B]`` (zero where ``tgt`` is IGNORE) weighted by
    ``head_decay**k``, and per-head top-1 accuracy of ``logits`` against ``tgt``."""
    valid = tgt != IGNORE
    counts = valid.sum(1)
    weights = torch.tensor([head_decay ** k for k in range(len(ce))], dtype=ce.dtype)
    loss = (ce.sum(1) / counts.clamp(min=1) * weights).sum()
    with torch.no_grad():
        hits = (logits.argmax(-1) == tgt) & valid
        accs = [float(h.sum() / c) if c else float("nan") for h, c in zip(hits, counts)]
    return loss, accs


def teacher_rows(rows: torch.Tensor, num_heads: int, num_rows: int) -> torch.Tensor:
    """``[K, B]``: the row whose base logits give the distribution head k learns at each of ``rows``
    (row t+1+k; clamped at the end, where the target is IGNORE and the row is masked anyway)."""
    offsets = torch.arange(1, num_heads + 1)
    return (rows.unsqueeze(0) + offsets.unsqueeze(1)).clamp(max=num_rows - 1)


def most_frequent(tokens: torch.Tensor, vocab_ids: torch.Tensor, n: int | None) -> torch.Tensor:
    """The ``n`` most frequent of ``vocab_ids`` in ``tokens``, sorted by id (all when ``n`` is None)."""
    if n is None or n >= len(vocab_ids):
        return vocab_ids
    counts = torch.bincount(tokens, minlength=int(vocab_ids.max()) + 1)[vocab_ids]
    return vocab_ids[counts.argsort(descending=True, stable=True)[:n]].sort().values


def split_records(num_records: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out split by whole answers, so no held-out position shares an answer with training."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_records, generator=g)
    n_held = min(num_records - 1, max(1, round(num_records * heldout_fraction))) if heldout_fraction > 0 else 0
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_heads(features: Features | str | os.PathLike, config: TrainConfig | None = None, *,
                max_steps: int | None = None, progress: bool = True,
                init: MedusaHeads | str | os.PathLike | None = None) -> TrainResult:
    """Train Medusa heads on cached features; returns the heads and held-out metrics.

    ``init``: heads (or their directory) to continue from, trained on earlier answers, instead of
    the identity blocks, so a data set that grows by the hour is trained in one pass, chunk by
    chunk, and no machine has to hold or recompute the features of all of it (one epoch over each
    chunk; the learning rate warms up and decays again per chunk).
    """
    cfg = config or TrainConfig()
    feats = features if isinstance(features, Features) else load_features(features)
    cdtype = getattr(torch, cfg.compute_dtype)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    targets = feats.targets(cfg.num_heads)
    train_rec, held_rec = split_records(len(feats.lengths), cfg.heldout_fraction, cfg.seed)
    train_rows = feats.record_rows(train_rec)
    train_rows = train_rows[targets[train_rows, 0] != IGNORE]
    held_rows = feats.record_rows(held_rec)
    held_rows = held_rows[targets[held_rows, 0] != IGNORE]

    vocab, hidden_size = feats.lm_head.shape
    heads = MedusaHeads(cfg.num_heads, cfg.num_layers, hidden_size, vocab,
                        shared_lm_head=cfg.shared_lm_head, token_conditioned=cfg.token_conditioned,
                        path_conditioned=cfg.path_conditioned, dtype=torch.float32)

    def embeds(rows: torch.Tensor) -> torch.Tensor | None:
        if not cfg.token_conditioned:
            return None
        return feats.token_embeds(rows, cfg.num_heads if cfg.path_conditioned else None).to(cdtype)

    if cfg.token_conditioned:
        embeds(train_rows[:1])  # fail now, not after the first epoch, if the cache lacks them
    if init is None:
        heads.zero_blocks()
    else:
        if not isinstance(init, MedusaHeads):
            from ..head_checkpoints import load_medusa_heads

            init = load_medusa_heads(init, hidden_size=hidden_size, vocab_size=vocab, dtype=torch.float32)
        _copy_blocks(init, heads)
    lm_head = feats.lm_head.to(cdtype)
    if not cfg.shared_lm_head:
        with torch.no_grad():
            heads.proj_weight.copy_(feats.lm_head.float().expand_as(heads.proj_weight))
    train_targets, train_proj = targets, lm_head
    if cfg.softmax_size is not None and (cfg.softmax_vocab != "data" or cfg.softmax_size < 10
                                         or (cfg.draft_vocab or 0) > cfg.softmax_size):
        raise ValueError("softmax_size needs softmax_vocab='data', at least 10 tokens and no fewer than "
                         f"draft_vocab, got softmax_size={cfg.softmax_size}, draft_vocab={cfg.draft_vocab}, "
                         f"softmax_vocab={cfg.softmax_vocab!r}")
    if cfg.softmax_vocab == "data":
        if not cfg.shared_lm_head:
            raise ValueError("softmax_vocab='data' needs the shared lm_head")
        train_tokens = feats.tokens[feats.record_rows(train_rec)].long()
        vocab_ids = most_frequent(train_tokens, train_tokens.unique(), cfg.softmax_size)
        remap = torch.full((vocab + 1,), IGNORE, dtype=torch.long)
        remap[vocab_ids] = torch.arange(len(vocab_ids))
        train_targets = remap[targets.clamp(min=-1)]  # IGNORE -> index -1 -> the IGNORE sentinel
        train_proj = lm_head[vocab_ids]
    elif cfg.softmax_vocab != "full":
        raise ValueError(f"softmax_vocab must be 'full' or 'data', got {cfg.softmax_vocab!r}")
    if cfg.draft_vocab is not None and (cfg.softmax_vocab != "data" or cfg.draft_vocab < 10):
        raise ValueError("draft_vocab needs softmax_vocab='data' and at least 10 tokens (trees use up "
                         f"to 10 guesses per head), got {cfg.draft_vocab} with "
                         f"softmax_vocab={cfg.softmax_vocab!r}")
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    total = max(1, round(steps_per_epoch * cfg.epochs))
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = max(1, round(total * cfg.warmup_fraction))
    g = torch.Generator().manual_seed(cfg.seed)

    history: list[float] = []
    ema_loss, ema_acc = None, [0.0] * cfg.num_heads
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    perm = torch.zeros(0, dtype=torch.long)
    cursor = 0
    heads.train()
    for step in range(total):
        if cursor + cfg.batch_size > len(perm):
            perm, cursor = train_rows[torch.randperm(len(train_rows), generator=g)], 0
        rows = perm[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, warmup, cfg.lr)
        with autocast(cdtype):
            logits = heads(feats.hidden[rows], train_proj if cfg.shared_lm_head else None,
                           token_embeds=embeds(rows))
        if cfg.soft_targets:
            with torch.no_grad():
                # The base distribution over the heads' softmax vocabulary (train_proj is always
                # the base lm_head's rows for it, also when the heads have their own projection).
                teacher = feats.hidden[teacher_rows(rows, cfg.num_heads, len(feats.hidden))].to(cdtype) @ train_proj.T
            loss, accs = soft_medusa_loss(logits, teacher, train_targets[rows], cfg.head_decay)
        else:
            loss, accs = medusa_loss(logits, train_targets[rows], cfg.head_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        history.append(value)
        ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
        ema_acc = [a if step == 0 else 0.95 * e + 0.05 * a for e, a in zip(ema_acc, accs)]
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.3f}", top1="/".join(f"{a:.2f}" for a in ema_acc))
    bar.close()
    heads.eval()

    held_loss, held_acc = float("nan"), [[0.0] * 10 for _ in range(cfg.num_heads)]
    if len(held_rows):
        with torch.inference_mode():
            losses = []
            for s in range(0, len(held_rows), 1024):
                rows = held_rows[s:s + 1024]
                with autocast(cdtype):
                    logits = heads(feats.hidden[rows], lm_head if cfg.shared_lm_head else None,
                                   token_embeds=embeds(rows))
                losses.append(float(medusa_loss(logits, targets[rows], cfg.head_decay)[0]) * len(rows))
            held_loss = sum(losses) / len(held_rows)
    if cfg.softmax_vocab == "data":
        # From here on the heads draft from the training vocabulary (its most frequent part).
        heads.token_map = most_frequent(train_tokens, vocab_ids, cfg.draft_vocab)
    if len(held_rows):
        ranks = head_ranks(heads, feats.hidden[held_rows], targets[held_rows],
                           lm_head if cfg.shared_lm_head else None, compute_dtype=cdtype,
                           token_embeds=embeds(held_rows))
        held_acc = rank_accuracies(ranks)
    tail = history[-max(1, min(50, len(history))):]
    return TrainResult(heads=heads, config=cfg, steps=total, train_positions=len(train_rows),
                       heldout_positions=len(held_rows), final_train_loss=sum(tail) / len(tail),
                       heldout_loss=held_loss, heldout_accuracies=held_acc, loss_history=history,
                       seconds=time.time() - t0, softmax_size=int(train_proj.shape[0]))


def _copy_blocks(src: MedusaHeads, dst: MedusaHeads) -> None:
    """Start ``dst`` from ``src``'s residual blocks; the shapes must match (a clear error if not)."""
    want = (dst.num_heads, dst.num_layers, dst.hidden_size, dst.token_conditioned)
    got = (src.num_heads, src.num_layers, src.hidden_size, src.token_conditioned)
    if got != want:
        raise ValueError("heads to continue from have (heads, layers, hidden size, token-conditioned) = "
                         f"{got}, the training settings ask for {want}")
    if src.block_bias is None or dst.block_bias is None or not src.shared_lm_head:
        raise ValueError("heads to continue from must have block biases and the shared lm_head")
    with torch.no_grad():
        dst.block_weight.copy_(src.block_weight)
        dst.block_bias.copy_(src.block_bias)
        if dst.token_weight is not None:
            dst.token_weight.copy_(src.token_weight)


def train_and_save(features_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   config: TrainConfig | None = None, *, base_model_name_or_path: str | None = None,
                   max_steps: int | None = None, init_heads: str | os.PathLike | None = None) -> TrainResult:
    """Train (continuing from the heads in ``init_heads``, if given), then write the heads in the
    FasterDecoding layout (bf16) to ``out_dir``."""
    feats = load_features(features_dir)
    result = train_heads(feats, config, max_steps=max_steps, init=init_heads)
    save_medusa_heads(result.heads, Path(out_dir), base_model_name_or_path or feats.meta["model"],
                      dtype=torch.bfloat16)
    return result
