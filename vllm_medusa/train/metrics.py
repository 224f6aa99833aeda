"""Head accuracy as the tree builder needs it: the rank of the true token in each head's top-k.

``accuracies[k][i]`` is the share of positions where head k's (i+1)-th guess is the right token
(per rank, not cumulative), the input of ``trees.optimal_tree``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..heads import MedusaHeads
from ..lookup import prompt_lookup
from .features import IGNORE

MISS = -1


def autocast(dtype: torch.dtype):
    """bf16/fp16 autocast on CPU; a no-op for float32 (CPU autocast rejects it)."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def head_ranks(heads: MedusaHeads, hidden: torch.Tensor, targets: torch.Tensor,
               lm_head: torch.Tensor | None, *, topk: int = 10, batch_size: int = 512,
               compute_dtype: torch.dtype = torch.bfloat16,
               token_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, K]`` rank (0-based) of the target among each head's top-``topk`` guesses.

    ``token_embeds [N, H]``: embeddings of the tokens produced at each row (token-conditioned heads);
    ``[K, N, H]``: one token per head (path-conditioned heads).

    ``MISS`` (-1) when the target is not in the top-k, ``IGNORE`` where there is no target.
    """
    n, k_heads = targets.shape
    out = torch.full((n, k_heads), IGNORE, dtype=torch.long)
    w = None if lm_head is None else lm_head.to(compute_dtype)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        with autocast(compute_dtype):
            logits = heads(hidden[sl], w, token_embeds=None if token_embeds is None else
                           token_embeds[sl] if token_embeds.dim() == 2 else token_embeds[:, sl])
        top = heads.map_tokens(logits.topk(topk, dim=-1).indices)  # [K, B, topk]
        tgt = targets[sl].t().unsqueeze(-1)  # [K, B, 1]
        hit = top == tgt
        rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(tgt[..., 0], MISS))
        rank = torch.where(tgt[..., 0] == IGNORE, torch.full_like(rank, IGNORE), rank)
        out[sl] = rank.t()
    return out


def rank_accuracies(ranks: torch.Tensor, topk: int = 10) -> list[list[float]]:
    """Per head, per rank share of positions (with a target) whose true token sits at that rank."""
    out = []
    for k in range(ranks.shape[1]):
        r = ranks[:, k]
        r = r[r != IGNORE]
        n = max(int(r.numel()), 1)
        out.append([float((r == i).sum()) / n for i in range(topk)])
    return out


def cumulative(accuracies: Sequence[Sequence[float]]) -> list[list[float]]:
    """Top-1..top-k accuracy (cumulative) from per-rank accuracies."""
    out = []
    for row in accuracies:
        acc, run = [], 0.0
        for a in row:
            run += a
            acc.append(run)
        out.append(acc)
    return out


def _accepted_depth(row: Sequence[int], nodes: set[tuple[int, ...]], depth_max: int) -> int:
    d = 0
    while d < depth_max and row[d] >= 0 and tuple(row[:d + 1]) in nodes:
        d += 1
    return d


def simulated_acceptance(ranks: torch.Tensor, tree: Sequence[Sequence[int]],
                         lengths: Sequence[int] | torch.Tensor | None = None,
                         lookup: LookupReplay | None = None) -> float:
    """Mean accepted length (accepted nodes + the base model's own token) of ``tree`` on real data.

    Without ``lengths``: the mean over every position (the tree accepts the deepest node whose every
    step holds the true token; no independence assumption). With ``lengths`` (rows per answer, in
    order): decoding is replayed step by step, jumping over accepted tokens, which is what the engine
    reports. The two differ because easy stretches are crossed in fewer steps, so per step the heads
    see the hard positions more often than per position. Rows where a needed head has no target (end
    of an answer) count only their valid depth. With ``lookup`` (replay only) each step also offers
    the prompt-lookup branch, and the longer of the two accepted paths counts (the grafted tree is a
    trie holding both).
    """
    nodes = {tuple(p) for p in tree}
    depth_max = max((len(p) for p in tree), default=0)
    rows = ranks.tolist()
    if lengths is None:
        total = sum(1 + _accepted_depth(r, nodes, depth_max) for r in rows)
        return total / max(len(rows), 1)
    tokens = steps = start = 0
    for a, n in enumerate(int(x) for x in lengths):
        j = 0
        while j < n:
            d = _accepted_depth(rows[start + j], nodes, depth_max)
            if lookup is not None:
                d = max(d, lookup.accepted(a, start, j, n))
            tokens += 1 + d
            steps += 1
            j += 1 + d
        start += n
    return tokens / max(steps, 1)


@dataclass
class LookupReplay:
    """The prompt-lookup branch (``lookup.prompt_lookup``) on recorded answers: ``prompts[a]`` and
    the answers' tokens concatenated in row order (``tokens``)."""

    prompts: Sequence[Sequence[int]]
    tokens: Sequence[int]
    min_n: int = 2
    max_n: int = 4
    k: int = 8

    def accepted(self, answer: int, start: int, j: int, n: int) -> int:
        """Branch tokens that match answer ``answer`` (rows ``start..start+n``) after its row ``j``."""
        done = self.tokens[start:start + j + 1]
        branch = prompt_lookup(np.asarray(list(self.prompts[answer]) + list(done)),
                               self.min_n, self.max_n, self.k).tolist()
        d = 0
        while d < len(branch) and j + 1 + d < n and branch[d] == self.tokens[start + j + 1 + d]:
            d += 1
        return d
