"""Prompt lookup: a draft branch copied from the request's own context, and what its nodes are worth.

Small models repeat themselves and their prompts (names, code, lists, loops). Where the last few
tokens occurred before in the prompt or the output, the tokens that followed them are a cheap and
often long guess (vLLM's ``ngram`` method; "prompt lookup decoding"). Medusa heads are weak exactly
there (a head guesses one position from one hidden state) and strong elsewhere, so the two are
complementary. Opt-in (``lookup``): each request's tree keeps its size (the adaptive policy's
budget); the branch's nodes take the places of Medusa nodes worth less (``trees.merge_branch``),
valued by how often the branch has been right after a match of the same length (``BranchStats``,
learned while serving), and may grow the tree while a further token pays for its node.
Verification is the same tree walk, so output stays exact; the branch only changes what is offered.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Sequence

import numpy as np

#: How often the lookup's first i tokens were all right, by match length (2, 3, 4 tokens): the demo
#: model's held-out MT-Bench answers, replayed step by step. Only a starting point for BranchStats.
PRIOR_HITS: dict[int, list[float]] = {
    2: [0.52, 0.34, 0.24, 0.19, 0.15, 0.13, 0.11, 0.10],
    3: [0.66, 0.46, 0.35, 0.29, 0.24, 0.21, 0.19, 0.16],
    4: [0.88, 0.80, 0.75, 0.70, 0.66, 0.63, 0.60, 0.58],
}


def longest_repeat(tokens: np.ndarray, min_n: int, max_n: int) -> tuple[int, int]:
    """``(end, n)``: the longest suffix of ``min_n..max_n`` tokens that occurred before, at its most
    recent earlier occurrence (a loop's latest turn is the best guess of the next one), which ends
    at index ``end``; ``(-1, 0)`` if none."""
    tokens = np.asarray(tokens)
    size = tokens.shape[0]
    if size < min_n + 1 or max_n < 1:
        return -1, 0
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if ends.size == 0:
        return -1, 0
    length = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for j in range(1, max_n):
        idx = ends - j
        alive &= idx >= 0
        alive[alive] = tokens[idx[alive]] == tokens[size - 1 - j]
        if not alive.any():
            break
        length += alive
    best = int(length.max())
    if best < min_n:
        return -1, 0
    return int(ends[np.flatnonzero(length == best)[-1]]), best


def continuation(tokens: np.ndarray, end: int, k: int) -> np.ndarray:
    """The ``k`` tokens after index ``end``; when they run into the end of the context the text is
    repeating with that period, and the continuation repeats it."""
    return np.resize(np.asarray(tokens)[end + 1:], k)


def prompt_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens predicted to follow ``tokens``: the ``continuation`` of its longest
    repeated suffix (``longest_repeat``)."""
    tokens = np.asarray(tokens)
    end, _ = longest_repeat(tokens, min_n, max_n)
    if end < 0 or k <= 0:
        return tokens[:0]
    return continuation(tokens, end, k)


class BranchStats:
    """How often the lookup branch's first i tokens are all right, per match length, learned from
    every branch drafted (offered or not): each is checked against the tokens the request actually
    produced next, once they are known. Counts fade (``decay``) as the workload changes; the prior
    weighs ``prior_weight`` branches."""

    def __init__(self, k: int, min_n: int, max_n: int, prior_weight: float = 16.0,
                 decay: float = 1 - 1 / 4096):
        self.k, self.decay = k, decay
        lengths = range(min_n, max_n + 1)
        self.trials = {n: np.zeros(k) for n in lengths}
        self.hits = {n: np.zeros(k) for n in lengths}
        self.prior = {n: self._prior(n) * prior_weight for n in lengths}
        self.prior_weight = prior_weight
        self._pending: dict[Hashable, deque] = {}

    def _prior(self, n: int) -> np.ndarray:
        near = np.asarray(PRIOR_HITS[min(max(n, min(PRIOR_HITS)), max(PRIOR_HITS))])
        if self.k <= near.size:
            return near[:self.k]
        return np.concatenate([near, near[-1] * 0.9 ** np.arange(1, self.k - near.size + 1)])

    def values(self, match_len: int) -> np.ndarray:
        """``[k]``: chance that the branch is right through its i-th token."""
        return (self.hits[match_len] + self.prior[match_len]) / (self.trials[match_len] + self.prior_weight)

    def drafted(self, key: Hashable, context: np.ndarray, match_len: int, branch: Sequence[int]) -> None:
        """Request ``key`` (tokens so far: ``context``) drafted ``branch`` after a ``match_len`` match."""
        pending = self._pending.setdefault(key, deque(maxlen=2 * self.k))
        pending.append((len(context), match_len, list(branch)))

    def update(self, key: Hashable, context: np.ndarray) -> None:
        """Score the request's earlier branches against the tokens it has produced since."""
        pending = self._pending.get(key)
        while pending:
            start, match_len, branch = pending[0]
            known = context[start:start + len(branch)].tolist()
            right = 0
            while right < len(known) and known[right] == branch[right]:
                right += 1
            if right == len(known) and len(known) < len(branch):
                break  # all right so far; wait for more tokens (later branches wait behind it)
            pending.popleft()
            self.trials[match_len] = self.trials[match_len] * self.decay
            self.hits[match_len] = self.hits[match_len] * self.decay
            self.trials[match_len][:len(branch)] += 1
            self.hits[match_len][:right] += 1

    def forget(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def summary(self) -> dict[str, list[float]]:
        return {str(n): [round(float(v), 3) for v in self.values(n)] for n in self.trials}
