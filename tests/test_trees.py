import itertools

import pytest
import torch

from vllm_medusa.trees import (MC_SIM_7B_63, MedusaTree, TreeError, chain, expected_acceptance_length,
                               optimal_tree, resolve_tree)


def test_published_tree_shape():
    tree = resolve_tree("mc_sim_7b_63", num_heads=5)
    per_depth = [tree.depths.count(d) for d in range(1, 5)]
    assert tree.num_nodes == 63 and per_depth == [10, 28, 23, 2]


def test_order_kept_when_parents_come_first_else_breadth_first():
    value_order = [(0,), (0, 0), (1,), (0, 0, 0), (0, 1)]
    assert list(MedusaTree.from_paths(value_order).paths) == value_order
    assert MedusaTree.from_paths([(0, 0), (0,), (1,)]).paths == ((0,), (1,), (0, 0))
    assert MedusaTree.from_paths(MC_SIM_7B_63).paths == tuple(MC_SIM_7B_63)


def test_optimal_prefixes_are_optimal():
    acc = [[0.5, 0.3, 0.1], [0.45, 0.2, 0.15], [0.35, 0.25, 0.05]]
    tree = optimal_tree(acc, 6)
    for n in range(1, 6):
        assert expected_acceptance_length(tree[:n], acc) == pytest.approx(_brute_force_best(acc, n))


def test_buffers_and_mask():
    tree = MedusaTree.from_paths([(0, 0), (0,), (1,), (0, 1), (1, 0), (0, 0, 0)])
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.parents == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths == [0, 1, 1, 2, 2, 2, 3]
    dense = tree.dense_mask()
    for i in range(tree.num_rows):
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = tree.parents[j]
        assert {j for j in range(tree.num_rows) if dense[i, j]} == anc
    assert not tree.is_chain and MedusaTree.from_paths(chain(3)).is_chain


def test_mask_uses_all_64_bits():
    paths = MC_SIM_7B_63
    tree = MedusaTree.from_paths(paths)
    m = tree.ancestor_mask_tensor()
    assert m.dtype == torch.int64 and tree.num_rows == 64
    assert tree.dense_mask()[63].sum() == tree.depths[63] + 1


def test_truncation_is_a_valid_tree():
    tree = resolve_tree("mc_sim_7b_63", num_heads=5)
    for n in range(0, 64):
        sub = tree.truncate(n)
        MedusaTree.from_paths(sub.paths)
        assert sub.num_nodes == n


@pytest.mark.parametrize("bad,msg", [
    ([(0, 0)], "no parent"),
    ([(0,), (-1,)], "negative"),
    ([(0,), "ab"], "not a non-empty list"),
    ([tuple([0] * d) for d in range(1, 7)], "only 5 Medusa heads"),
    ([(i,) for i in range(64)], "at most 63"),
])
def test_impossible_trees_fail_clearly(bad, msg):
    with pytest.raises(TreeError, match=msg):
        MedusaTree.from_paths(bad, num_heads=5, max_topk=100)


def test_resolve_specs(tmp_path):
    f = tmp_path / "t.json"
    f.write_text("[[0], [1], [0, 0]]")
    assert resolve_tree(str(f), num_heads=3).num_nodes == 3
    assert resolve_tree("chain-3", num_heads=3).is_chain
    with pytest.raises(TreeError, match="unknown tree"):
        resolve_tree("nope", num_heads=3)


def _brute_force_best(acc, budget):
    """All prefix-closed sets of `budget` nodes from a small universe."""
    universe = [p for d in range(1, len(acc) + 1) for p in itertools.product(range(len(acc[0])), repeat=d)]
    best = 0.0
    for combo in itertools.combinations(universe, budget):
        s = set(combo)
        if all(len(p) == 1 or p[:-1] in s for p in combo):
            best = max(best, expected_acceptance_length(list(combo), acc))
    return best


def test_optimal_tree_matches_hand_example():
    acc = [[0.6, 0.2], [0.4, 0.1]]
    # Values: (0,)=.6 (0,0)=.24 (1,)=.2 (0,1)=.06 (1,0)=.08
    assert optimal_tree(acc, 3) == [(0,), (0, 0), (1,)]
    assert expected_acceptance_length([(0,), (1,), (0, 0)], acc) == pytest.approx(1 + .6 + .2 + .24)


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5])
def test_optimal_tree_is_optimal(budget):
    acc = [[0.5, 0.3, 0.1], [0.45, 0.2, 0.15], [0.35, 0.25, 0.05]]
    tree = optimal_tree(acc, budget)
    assert expected_acceptance_length(tree, acc) == pytest.approx(_brute_force_best(acc, budget))


def test_top1_chain_follows_each_heads_first_guess():
    from vllm_medusa.trees import top1_chain

    tree = MedusaTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]])
    tokens = [10, 11, 20, 21, 22, 30, 31]  # row i holds tokens[i - 1]
    chain_tree, chain_tokens = top1_chain(tree, tokens)
    assert chain_tree.is_chain and chain_tree.num_nodes == 3
    assert chain_tokens == [10, 20, 30]
    assert top1_chain(MedusaTree.from_paths([[1]]), [5]) == (MedusaTree(()), [])
