"""Tree verification: walk each request's tree with the base model's own sampler.

At the current node (starting at the root) a token x is drawn from the base model's processed
distribution at that node, exactly as plain decoding would draw it. If a child of the node holds x,
the walk moves there and repeats; otherwise x is emitted as the bonus token and the walk stops.
Every emitted token is therefore an exact sample of the base model (greedy: its argmax), which makes
the method lossless, and the chance to advance is the mass of the children's tokens.

Typical acceptance (opt-in, lossy, Medusa paper): a child is accepted without sampling when its
probability exceeds ``min(epsilon, alpha * exp(-entropy))``; the most probable such child wins.

One request's bad data costs that request its speculation at most, never the batch: a tree that
names rows beyond its drafts is verified as no draft, and a node whose logits are not finite (NaN or
inf, e.g. from a broken tree row) is never stepped into: the token drawn at its parent, an exact
sample, is emitted as the bonus instead; -inf entries alone are masked tokens, not a fault. (A root row's non-finite logits are plain decoding's own
row; the sampler treats them as plain vLLM does.)

All requests advance one tree level per sampler call, so the sampler runs ``depth + 1`` times per
step on ``[batch, vocab]`` logits, whatever the tree sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

#: ``sample(rows, history)`` -> one token per request, drawn from ``logits[rows[b]]`` for request b;
#: ``history[b]`` are the tokens already emitted by request b in this step.
SampleFn = Callable[[torch.Tensor, list[list[int]]], list[int]]


@dataclass
class TypicalAcceptance:
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def accept(self, logits: torch.Tensor, temperature: torch.Tensor,
               candidates: Sequence[Sequence[int]]) -> list[int]:
        """Index into ``candidates[b]`` of the accepted child per request (-1: none)."""
        t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        probs = torch.softmax(logits.float() / t[:, None], dim=-1)
        entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
        threshold = torch.minimum(torch.full_like(entropy, self.posterior_threshold),
                                  self.posterior_alpha * torch.exp(-entropy))
        chosen = []
        for b, cands in enumerate(candidates):
            best, best_p = -1, -1.0
            if temperature[b] > 0:
                for i, tok in enumerate(cands):
                    p = float(probs[b, tok])
                    if p > threshold[b] and p > best_p:
                        best, best_p = i, p
            chosen.append(best)
        return chosen


@dataclass
class TreeWalkResult:
    """Per request: emitted tokens (accepted path + bonus), accepted node rows, and the row of the
    last accepted node (0 = root), whose hidden state drafts the next tree."""

    tokens: list[list[int]]
    accepted_rows: list[list[int]]
    last_rows: list[int]
    levels: int


def walk_trees(row_starts: Sequence[int], children: Sequence[Sequence[Sequence[int]]],
               draft_tokens: Sequence[Sequence[int]], sample: SampleFn,
               logits: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
               typical: TypicalAcceptance | None = None) -> TreeWalkResult:
    """Verify one step's trees.

    Request b's rows start at ``row_starts[b]`` (row 0 = root); ``children[b][i]`` lists the child
    rows of row i (only rows that were actually scheduled); ``draft_tokens[b][i - 1]`` is the token
    of row i. A request without drafts has ``children[b] == [[]]``: one sample, like plain decoding.
    """
    batch = len(row_starts)
    children = [kids if _tree_fits(kids, len(drafts)) else [[]]
                for kids, drafts in zip(children, draft_tokens)]
    cur = [0] * batch
    active = [True] * batch
    tokens: list[list[int]] = [[] for _ in range(batch)]
    accepted: list[list[int]] = [[] for _ in range(batch)]
    levels = 0
    starts = torch.as_tensor(list(row_starts), dtype=torch.int64)
    while any(active):
        rows = starts + torch.as_tensor(cur, dtype=torch.int64)
        if logits is not None and levels:
            _back_off_non_finite(logits, rows, cur, active, accepted)
            if not any(active):
                break
            rows = starts + torch.as_tensor(cur, dtype=torch.int64)
        typical_pick = [-1] * batch
        if typical is not None and logits is not None and temperature is not None:
            cands = [[draft_tokens[b][c - 1] for c in children[b][cur[b]]] if active[b] else []
                     for b in range(batch)]
            typical_pick = typical.accept(logits[rows], temperature, cands)
        drawn = sample(rows, tokens)
        levels += 1
        for b in range(batch):
            if not active[b]:
                continue
            kids = children[b][cur[b]]
            if typical_pick[b] >= 0:
                child = kids[typical_pick[b]]
                x = draft_tokens[b][child - 1]
            else:
                x = drawn[b]
                child = next((c for c in kids if draft_tokens[b][c - 1] == x), -1)
            tokens[b].append(x)
            if child < 0:
                active[b] = False
            else:
                accepted[b].append(child)
                cur[b] = child
    return TreeWalkResult(tokens, accepted, cur, levels)


def _tree_fits(children: Sequence[Sequence[int]], num_drafts: int) -> bool:
    """Every child row names a draft token (rows 1..num_drafts), and the root's list exists."""
    return len(children) >= 1 and all(1 <= c <= num_drafts and c < len(children)
                                      for kids in children for c in kids)


def _back_off_non_finite(logits: torch.Tensor, rows: torch.Tensor, cur: list[int],
                         active: list[bool], accepted: list[list[int]]) -> None:
    """Active requests standing on a node (not the root) whose logits row is broken (a NaN, a +inf,
    or nothing above -inf; single -inf entries are tokens masked on purpose, e.g. by a grammar's
    bitmask) step back to its parent and stop: the token drawn there, already emitted, becomes the
    bonus token."""
    on_node = [b for b in range(len(cur)) if active[b] and cur[b] != 0]
    if not on_node:
        return
    # amax propagates NaN, so one reduction finds all three cases.
    finite = torch.isfinite(logits[rows[on_node].to(logits.device)].amax(dim=-1)).tolist()
    for b, ok in zip(on_node, finite):
        if not ok:
            accepted[b].pop()
            cur[b] = accepted[b][-1] if accepted[b] else 0
            active[b] = False


def pack_outputs(tokens: Sequence[Sequence[int]], width: int, device: torch.device | str = "cpu",
                 placeholder: int = -1) -> torch.Tensor:
    """vLLM's sampler output: ``[batch, width]`` int32 padded with the placeholder id."""
    out = torch.full((len(tokens), width), placeholder, dtype=torch.int32)
    for b, toks in enumerate(tokens):
        out[b, :len(toks)] = torch.as_tensor(toks, dtype=torch.int32)
    return out.to(device)
