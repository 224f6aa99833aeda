"""Medusa candidate trees: presets, validation, per-tree buffers and the optimal-tree builder.

A tree is a list of index paths (``medusa_choices``). Path ``(i1, ..., id)`` is the node holding the
``i_d``-th most likely token of head ``d-1`` under node ``(i1, ..., i_{d-1})``. Row 0 of a tree is
the *root*: the token just sampled from the base model. Nodes are kept in an order where every
parent comes before its children, so every prefix of the list is itself a valid tree and truncating
a tree to fit a budget is slicing. A list already in such an order keeps it: the greedy
construction's value order (``optimal_tree``, and the published ``mc_sim_7b_63``) makes each prefix
the best tree of its size. Other lists are sorted breadth-first.
"""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence, Union

import torch

Path = tuple[int, ...]
TreeSpec = Union[str, Sequence[Sequence[int]], "MedusaTree"]

#: Tree rows (root + nodes) are limited so that an ancestor set fits one int64 bitmask.
MAX_TREE_ROWS = 64

# The published 63-node tree of FasterDecoding/Medusa for Vicuna-7B (nodes per depth 10/28/23/2).
MC_SIM_7B_63: list[Path] = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3),
    (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0),
    (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
]


def masks_to_dense(masks: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[..., rows]`` int64 ancestor bitmasks -> ``[..., rows, num_rows]`` bool."""
    bits = torch.arange(num_rows, dtype=torch.int64, device=masks.device)
    return ((masks.unsqueeze(-1) >> bits) & 1).bool()


class TreeError(ValueError):
    """An impossible or malformed tree."""


def chain(depth: int) -> list[Path]:
    """Top-1 guess of each of the first ``depth`` heads: upstream vLLM's chain Medusa."""
    return [tuple([0] * d) for d in range(1, depth + 1)]


def _small_default() -> list[Path]:
    # A compact tree for CPUs, where a step costs the same up to ~6 tokens.
    return [(0,), (0, 0), (1,), (0, 0, 0), (0, 1), (0, 0, 0, 0)]


PRESETS: dict[str, list[Path]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "small": _small_default(),
}


def preset_names() -> list[str]:
    return sorted(PRESETS) + ["chain-N (N = 1..5)"]


def sort_paths(paths: Sequence[Sequence[int]]) -> list[Path]:
    """Breadth-first order: by length, then lexicographically; duplicates removed."""
    return sorted({tuple(int(i) for i in p) for p in paths}, key=lambda p: (len(p), p))


@dataclass(frozen=True)
class MedusaTree:
    """A validated tree and the buffers the runner needs (all derived, all row-indexed).

    Row 0 is the root; row ``i >= 1`` is ``paths[i - 1]``.
    """

    paths: tuple[Path, ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @staticmethod
    def from_paths(paths: Sequence[Sequence[int]], num_heads: int | None = None,
                   max_topk: int | None = None) -> "MedusaTree":
        """Validate ``paths`` (any order) and build the tree; raises ``TreeError`` naming the fault."""
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
            raise TreeError(f"a tree is a list of index paths, got {type(paths).__name__}")
        for p in paths:
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
                raise TreeError(f"tree path {p!r} is not a non-empty list of integers")
            for i in p:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise TreeError(f"tree path {list(p)} has a non-integer or negative index {i!r}")
        given = list(dict.fromkeys(tuple(int(i) for i in p) for p in paths))
        present = set(given)
        for p in given:
            if len(p) > 1 and p[:-1] not in present:
                raise TreeError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
        seen: set[Path] = set()
        ordered = given
        for p in given:
            if len(p) > 1 and p[:-1] not in seen:
                ordered = sort_paths(given)
                break
            seen.add(p)
        if len(ordered) + 1 > MAX_TREE_ROWS:
            raise TreeError(f"tree has {len(ordered)} nodes; at most {MAX_TREE_ROWS - 1} are supported")
        if num_heads is not None and ordered and max(len(p) for p in ordered) > num_heads:
            raise TreeError(f"tree is {max(len(p) for p in ordered)} deep but the checkpoint has "
                            f"only {num_heads} Medusa heads")
        if max_topk is not None and ordered and max(max(p) for p in ordered) >= max_topk:
            raise TreeError(f"tree uses top-{max(max(p) for p in ordered) + 1} guesses; at most "
                            f"top-{max_topk} are supported")
        return MedusaTree(tuple(ordered))

    @property
    def num_nodes(self) -> int:
        """Speculative nodes (excluding the root): the number of draft tokens per step."""
        return len(self.paths)

    @property
    def num_rows(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @cached_property
    def max_topk(self) -> int:
        return max((max(p) for p in self.paths), default=-1) + 1

    def truncate(self, num_nodes: int) -> "MedusaTree":
        """The first ``num_nodes`` nodes: a valid subtree thanks to breadth-first order."""
        if num_nodes >= self.num_nodes:
            return self
        return _truncated(self, max(num_nodes, 0))

    @cached_property
    def parents(self) -> list[int]:
        """Parent row of each row (-1 for the root)."""
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        return [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in self.paths]

    @cached_property
    def depths(self) -> list[int]:
        return [0] + [len(p) for p in self.paths]

    @cached_property
    def ranks(self) -> list[int]:
        """Which top-k guess of head ``depth-1`` each row holds (-1 for the root)."""
        return [-1] + [p[-1] for p in self.paths]

    @cached_property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.num_rows)]
        for row, parent in enumerate(self.parents):
            if parent >= 0:
                kids[parent].append(row)
        return kids

    @cached_property
    def ancestor_masks(self) -> list[int]:
        """Bit j of row i is set iff row j is an ancestor of row i or i itself (signed int64)."""
        masks = [1]
        for row in range(1, self.num_rows):
            masks.append(masks[self.parents[row]] | (1 << row))
        return [m - (1 << 64) if m >= 1 << 63 else m for m in masks]

    def ancestor_mask_tensor(self) -> torch.Tensor:
        return torch.tensor(self.ancestor_masks, dtype=torch.int64)

    def dense_mask(self) -> torch.Tensor:
        """``[rows, rows]`` bool: True where row i may attend to row j."""
        return masks_to_dense(self.ancestor_mask_tensor(), self.num_rows)

    @cached_property
    def levels(self) -> list[tuple[list[int], list[int], list[int], list[int]]]:
        """Per depth d = 1..depth: (parent rows with children at d, the rows at d, each one's
        parent as an index into the first list, each one's rank): how a tree is drafted depth by
        depth by path-conditioned heads, which guess a node's children from its own token."""
        out = []
        for d in range(1, self.depth + 1):
            rows = [r for r in range(1, self.num_rows) if self.depths[r] == d]
            parents = sorted({self.parents[r] for r in rows})
            where = {p: i for i, p in enumerate(parents)}
            out.append((parents, rows, [where[self.parents[r]] for r in rows], [self.ranks[r] for r in rows]))
        return out

    @cached_property
    def is_chain(self) -> bool:
        return all(p == i for i, p in enumerate(self.parents[1:]))

    def to_json(self) -> str:
        return json.dumps([list(p) for p in self.paths])


#: The rank index of grafted nodes (not a head's guess); ranks a head can produce are < max_topk.
GRAFT_RANK = 1 << 16


def top1_chain(tree: MedusaTree, tokens: Sequence[int]) -> tuple[MedusaTree, list[int]]:
    """The tree's path of every head's top guess, as a chain with its draft tokens (``tokens[i - 1]``
    is row i's). A request whose output a grammar constrains is verified with it: vLLM validates
    and masks a request's drafts as consecutive positions, which a chain is and a tree is not."""
    rows, row = [], 0
    while (row := next((c for c in tree.children[row] if tree.ranks[c] == 0), -1)) > 0:
        rows.append(row)
    return MedusaTree(tuple(chain(len(rows)))), [tokens[r - 1] for r in rows]


def graft_chain(tree: MedusaTree, drafts: Sequence[int], branch: Sequence[int],
                max_nodes: int) -> tuple[MedusaTree, list[int]]:
    """``tree`` with draft tokens ``drafts`` plus the chain ``branch`` hanging from the root.

    The branch follows existing nodes while their tokens agree and continues as new nodes
    (rank ``GRAFT_RANK``) from where they differ, so the tree stays a trie and verification accepts
    the longer of the two guesses. New nodes come after the old ones, keeping every prefix a valid
    tree. At most ``max_nodes`` nodes in all (capped to ``MAX_TREE_ROWS - 1``).
    """
    max_nodes = min(max_nodes, MAX_TREE_ROWS - 1)
    paths = list(tree.paths)
    tokens = list(drafts)
    children = tree.children
    row, path = 0, ()
    for i, tok in enumerate(branch):
        child = next((c for c in children[row] if tokens[c - 1] == tok), None)
        if child is None:
            room = max_nodes - len(paths)
            if room <= 0:
                break
            for new in branch[i:i + room]:
                path = path + (GRAFT_RANK,)
                paths.append(path)
                tokens.append(int(new))
            break
        row, path = child, paths[child - 1]
    if len(paths) == tree.num_nodes:
        return tree, tokens
    return MedusaTree(tuple(paths)), tokens


def node_values(tree: MedusaTree, accuracies: Sequence[Sequence[float]]) -> list[float]:
    """Per node (row 1..), the chance that it is accepted: the product of the per-rank accuracies
    along its path (``expected_acceptance_length`` is 1 + their sum). Grafted nodes are worth 0."""
    values = [1.0]
    for row in range(1, tree.num_rows):
        depth, rank = tree.depths[row] - 1, tree.ranks[row]
        acc = accuracies[depth][rank] if depth < len(accuracies) and rank < len(accuracies[depth]) else 0.0
        values.append(values[tree.parents[row]] * acc)
    return values[1:]


def merge_branch(tree: MedusaTree, drafts: Sequence[int], values: Sequence[float],
                 branch: Sequence[int], branch_values: Sequence[float],
                 extend_above: Sequence[float] = (), limit: int | None = None) -> tuple[MedusaTree, list[int]]:
    """The tree of the same size holding the most valuable of ``tree``'s nodes (``values``; a prefix
    in the tree's order is kept, which is the best subtree when that order is by value, as
    ``optimal_tree`` makes it) and of the chain ``branch`` from the root (``branch_values[i]``: the
    chance that its first i+1 tokens are right).

    Nodes the branch shares with the kept tree are free. A chain stays a chain (no tree pass of
    attention): the branch replaces it when its first n tokens are worth more. A branch that made it
    into the tree goes on beyond the size while its next token is worth more than the next node
    costs (``extend_above[i]``: the price of the (i+1)-th extra node, in accepted tokens; a long
    repeat is worth a bigger step), up to ``limit`` nodes in all.
    """
    n = tree.num_nodes
    if n == 0 or len(branch) == 0:
        return tree, list(drafts)
    limit = max(n, limit if limit is not None else n)

    def extra(start: int) -> int:
        """Branch nodes from position ``start`` on that pay for the extra node each one is."""
        count = 0
        for i, price in enumerate(extend_above):
            if start + i >= min(len(branch), len(branch_values)) or branch_values[start + i] <= price:
                break
            count += 1
        return count

    if tree.is_chain:
        if sum(branch_values[:n]) > sum(values[:n]):
            length = min(n + extra(n), limit, len(branch))
            return graft_chain(tree.truncate(0), [], branch[:length], length)
        return tree, list(drafts)
    kept = taken = 0
    while kept + taken < n:
        if taken < len(branch) and (kept >= n or branch_values[taken] > values[kept]):
            taken += 1
        else:
            kept += 1
    if taken:
        taken = min(taken + extra(taken), limit - kept)
    return graft_chain(tree.truncate(kept), drafts[:kept], branch, kept + taken)


def _truncated(tree: MedusaTree, n: int) -> MedusaTree:
    key = ("trunc", n)
    cached = tree._cache.get(key)
    if cached is None:
        cached = tree._cache[key] = MedusaTree(tree.paths[:n])
    return cached


def resolve_tree(spec: TreeSpec | None, num_heads: int, max_topk: int = 10,
                 default: Sequence[Sequence[int]] | None = None) -> MedusaTree:
    """Turn a user's ``tree`` option into a validated tree.

    ``spec`` is a preset name (``mc_sim_7b_63``, ``small``, ``chain-3``), a path to a JSON file holding
    a list of index paths, the list itself, or None for ``default`` (the heads' calibrated tree).
    Paths deeper than ``num_heads`` are an error, not silently dropped.
    """
    if isinstance(spec, MedusaTree):
        return MedusaTree.from_paths(spec.paths, num_heads, max_topk)
    if spec is None:
        spec = default if default is not None else chain(num_heads)
    if isinstance(spec, str):
        name = spec.strip()
        if name in PRESETS:
            spec = PRESETS[name]
        elif name.startswith("chain-") and name[6:].isdigit():
            spec = chain(int(name[6:]))
        elif name.startswith("[") or os.path.isfile(name):
            text = name if name.startswith("[") else open(name).read()
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise TreeError(f"tree {name!r} is not valid JSON: {e}") from e
        else:
            raise TreeError(f"unknown tree {name!r}: not a preset ({', '.join(preset_names())}) "
                            "and not a JSON file")
    return MedusaTree.from_paths(spec, num_heads, max_topk)


def expected_acceptance_length(tree: MedusaTree | Sequence[Sequence[int]],
                               accuracies: Sequence[Sequence[float]]) -> float:
    """1 + sum over nodes of the product of per-rank accuracies along the path.

    ``accuracies[k][i]`` is the probability that head k's (i+1)-th guess is the right token
    (per rank, not cumulative), assumed independent across heads.
    """
    paths = tree.paths if isinstance(tree, MedusaTree) else [tuple(p) for p in tree]
    total = 1.0
    for p in paths:
        prob = 1.0
        for k, i in enumerate(p):
            prob *= accuracies[k][i] if k < len(accuracies) and i < len(accuracies[k]) else 0.0
        total += prob
    return total


def optimal_tree(accuracies: Sequence[Sequence[float]], budget: int) -> list[Path]:
    """The tree of ``budget`` nodes with the highest expected acceptance length.

    A node's value is the product of accuracies along its path and no child is worth more than its
    parent, so the ``budget`` most valuable nodes form a valid tree: taking them greedily from the
    frontier (children of chosen nodes) is optimal, the Medusa paper's construction.
    Ties break toward shallower, lower-rank paths. The nodes come in the order they were chosen, so
    every prefix of the result is the optimal tree of its own size.
    """
    budget = min(budget, MAX_TREE_ROWS - 1)
    heap: list[tuple[float, int, Path]] = []

    def push_children(parent: Path, value: float) -> None:
        k = len(parent)
        if k < len(accuracies):
            for i, acc in enumerate(accuracies[k]):
                if acc > 0:
                    heapq.heappush(heap, (-value * acc, k + 1, parent + (i,)))

    push_children((), 1.0)
    chosen: list[Path] = []
    while heap and len(chosen) < budget:
        neg, _, path = heapq.heappop(heap)
        chosen.append(path)
        push_children(path, -neg)
    return chosen
