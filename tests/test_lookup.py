"""Prompt lookup against a brute-force reference, and grafting its branch onto Medusa trees."""

import numpy as np
import pytest

from vllm_medusa.lookup import BranchStats, longest_repeat, prompt_lookup
from vllm_medusa.trees import GRAFT_RANK, MAX_TREE_ROWS, MedusaTree, graft_chain, merge_branch, node_values


def reference_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Longest suffix n-gram, most recent earlier occurrence, continuation extended periodically."""
    n_tok = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n_tok <= n:
            continue
        suffix = tokens[n_tok - n:]
        for start in range(n_tok - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                out = []
                while len(out) < k:
                    i = start + n + len(out)
                    out.append(tokens[i] if i < n_tok else out[len(out) - (n_tok - start - n)])
                return out
    return []


@pytest.mark.parametrize("seed", range(40))
def test_prompt_lookup_matches_reference(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 60))
    tokens = rng.integers(0, int(rng.integers(2, 6)), size=length).tolist()
    for min_n, max_n, k in ((1, 1, 3), (2, 4, 8), (1, 3, 5), (3, 6, 2)):
        got = prompt_lookup(np.array(tokens), min_n, max_n, k).tolist()
        assert got == reference_lookup(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)


def test_prompt_lookup_cases():
    # The latest earlier occurrence wins, and the longest n-gram before a shorter one.
    assert prompt_lookup(np.array([5, 1, 2, 7, 1, 2, 8, 9, 1, 2]), 2, 4, 2).tolist() == [8, 9]
    assert prompt_lookup(np.array([3, 1, 2, 7, 9, 3, 1, 2, 8, 9, 1, 2]), 1, 3, 1).tolist() == [8]
    assert prompt_lookup(np.array([4, 5, 6, 4, 5, 6, 4, 5]), 2, 4, 5).tolist() == [6, 4, 5, 6, 4]
    assert prompt_lookup(np.array([1, 2, 3, 4]), 2, 4, 4).size == 0  # nothing repeats
    assert prompt_lookup(np.array([7]), 1, 4, 4).size == 0
    assert prompt_lookup(np.array([1, 2, 1, 2]), 2, 4, 0).size == 0
    assert longest_repeat(np.array([7, 8, 9, 40, 41, 7, 8, 9]), 2, 4) == (2, 3)
    assert longest_repeat(np.array([7, 8, 9, 40, 41, 7, 8, 9]), 4, 4) == (-1, 0)


TREE = MedusaTree.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
DRAFTS = [10, 11, 20, 21, 30]  # rows 1..5: (0,)=10 (1,)=11 (0,0)=20 (0,1)=21 (0,0,0)=30


def path_tokens(tree: MedusaTree, drafts: list[int], row: int) -> list[int]:
    out = []
    while row > 0:
        out.append(drafts[row - 1])
        row = tree.parents[row]
    return out[::-1]


def test_graft_follows_agreeing_nodes_then_branches():
    tree, drafts = graft_chain(TREE, DRAFTS, [10, 21, 40, 41], max_nodes=20)
    assert tree.paths[:TREE.num_nodes] == TREE.paths and drafts[:5] == DRAFTS
    assert drafts[5:] == [40, 41]
    assert path_tokens(tree, drafts, tree.num_rows - 1) == [10, 21, 40, 41]
    assert tree.ranks[-2:] == [GRAFT_RANK, GRAFT_RANK]
    assert MedusaTree.from_paths(tree.paths).paths == tree.paths  # a valid, parent-first tree
    # every node's token sequence is unique (still a trie)
    seqs = [tuple(path_tokens(tree, drafts, r)) for r in range(1, tree.num_rows)]
    assert len(set(seqs)) == len(seqs)


def test_graft_from_root_limits_and_noops():
    tree, drafts = graft_chain(TREE, DRAFTS, [12, 13, 14], max_nodes=7)
    assert tree.num_nodes == 7 and drafts[5:] == [12, 13]
    assert tree.parents[6] == 0 and tree.parents[7] == 6 and not tree.is_chain
    same, d = graft_chain(TREE, DRAFTS, [10, 20, 30], max_nodes=20)  # already in the tree
    assert same is TREE and d == DRAFTS
    full, d = graft_chain(TREE, DRAFTS, [12], max_nodes=5)
    assert full is TREE and d == DRAFTS
    empty = MedusaTree.from_paths([])
    only, d = graft_chain(empty, [], [1, 2, 3], max_nodes=8)
    assert only.is_chain and d == [1, 2, 3]
    big = MedusaTree.from_paths([(i,) for i in range(MAX_TREE_ROWS - 2)])
    capped, d = graft_chain(big, list(range(100, 100 + big.num_nodes)), [1, 2, 3], max_nodes=99)
    assert capped.num_rows == MAX_TREE_ROWS and d[-1] == 1
    # the scheduler may cut a grafted tree short: every prefix is still a valid tree
    for n in range(tree.num_nodes + 1):
        assert MedusaTree.from_paths(tree.truncate(n).paths).num_nodes == n


def test_merge_branch_keeps_the_size_and_the_most_valuable_nodes():
    values = [0.4, 0.3, 0.2, 0.1, 0.05]  # TREE's nodes in order
    # a reliable branch: its three new nodes beat the tree's last three
    tree, drafts = merge_branch(TREE, DRAFTS, values, [12, 13, 14], [0.9, 0.8, 0.7])
    assert tree.num_nodes == TREE.num_nodes and drafts == DRAFTS[:2] + [12, 13, 14]
    # a weak branch changes nothing
    same, d = merge_branch(TREE, DRAFTS, values, [12, 13], [0.01, 0.005])
    assert same is TREE and d == DRAFTS
    # shared nodes are free: 10 -> 20 are kept, the branch continues below them
    tree, drafts = merge_branch(TREE, DRAFTS, values, [10, 20, 31, 32], [0.9, 0.8, 0.35, 0.3])
    assert drafts == [10, 11, 20, 31, 32] and path_tokens(tree, drafts, 5) == [10, 20, 31, 32]
    # a chain stays a chain: replaced by the branch only when that is worth more
    chain3 = MedusaTree.from_paths([(0,), (0, 0), (0, 0, 0)])
    tree, drafts = merge_branch(chain3, [1, 2, 3], [0.4, 0.2, 0.1], [7, 8, 9, 10], [0.5, 0.3, 0.2, 0.1])
    assert tree.is_chain and drafts == [7, 8, 9]
    tree, drafts = merge_branch(chain3, [1, 2, 3], [0.4, 0.2, 0.1], [7, 8], [0.3, 0.1])
    assert tree is chain3 and drafts == [1, 2, 3]


def test_a_valuable_branch_grows_the_tree_up_to_the_limit():
    chain2 = MedusaTree.from_paths([(0,), (0, 0)])
    branch, hits = [7, 8, 9, 10, 11], [0.9, 0.8, 0.7, 0.6, 0.2]
    cheap = [0.5] * 8
    tree, drafts = merge_branch(chain2, [1, 2], [0.4, 0.2], branch, hits, cheap, limit=10)
    assert tree.is_chain and drafts == [7, 8, 9, 10]
    tree, drafts = merge_branch(chain2, [1, 2], [0.4, 0.2], branch, hits, cheap, limit=3)
    assert drafts == [7, 8, 9]
    tree, drafts = merge_branch(chain2, [1, 2], [0.4, 0.2], branch, hits, [0.65, 0.65], limit=10)
    assert drafts == [7, 8, 9]  # 0.7 pays for the first extra node, 0.6 not for the second
    tree, drafts = merge_branch(chain2, [1, 2], [0.4, 0.2], branch, hits, [0.75, 0.1], limit=10)
    assert drafts == [7, 8]  # the 2nd extra node is cheap, but the first stops the growth
    tree, drafts = merge_branch(chain2, [1, 2], [0.4, 0.2], branch, hits, [0.95], limit=10)
    assert drafts == [7, 8]  # nothing worth its cost beyond the size
    values = [0.4, 0.3, 0.2, 0.1, 0.05]
    tree, drafts = merge_branch(TREE, DRAFTS, values, [12, 13, 14], [0.9, 0.8, 0.7], cheap, 8)
    assert drafts == DRAFTS[:2] + [12, 13, 14]  # already all in: nothing to grow
    tree, drafts = merge_branch(TREE, DRAFTS, values, branch, hits, cheap, 7)
    assert drafts == [10, 7, 8, 9, 10]  # 4 branch nodes beat all but one; the 5th is not worth it
    tree, drafts = merge_branch(TREE, DRAFTS, values, branch, hits, [0.1] * 8, 7)
    assert drafts == [10, 7, 8, 9, 10, 11] and tree.num_nodes == 6  # worth it: grows past 5
    weak = [0.5, 0.45, 0.05, 0.01, 0.005]  # takes two places and must not grow into the rest
    tree, drafts = merge_branch(TREE, DRAFTS, values, branch, weak, [0.1] * 8, 16)
    assert drafts == [10, 11, 20, 7, 8] and tree.num_nodes == TREE.num_nodes


def test_node_values_are_path_products():
    acc = [[0.5, 0.2], [0.4, 0.1]]
    assert node_values(TREE, acc) == pytest.approx([0.5, 0.2, 0.2, 0.05, 0.0])  # depth 3: no head


def test_branch_stats_learn_from_the_tokens_produced_later():
    stats = BranchStats(k=4, min_n=2, max_n=4, prior_weight=1.0, decay=1.0)
    prior = stats.values(3).copy()
    context = np.array([5, 6, 7, 1, 2, 3])
    stats.drafted("a", context, 3, [9, 9, 9, 9])
    stats.update("a", np.concatenate([context, [9]]))  # right so far: undecided
    assert stats.values(3).tolist() == prior.tolist()
    stats.update("a", np.concatenate([context, [9, 9, 4]]))  # wrong at the third token
    assert stats.values(3).tolist() == pytest.approx(((np.array([1, 1, 0, 0]) + prior) / 2).tolist())
    stats.drafted("b", context, 2, [1, 2])
    stats.forget("b")
    stats.update("b", np.concatenate([context, [1, 2]]))
    assert stats.trials[2].sum() == 0


def test_proposer_puts_the_lookup_branch_into_each_requests_tree():
    import torch

    from vllm_medusa.config import MedusaOptions
    from vllm_medusa.heads import MedusaHeads
    from vllm_medusa.policy import TreeBudgetPolicy
    from vllm_medusa.proposer import MedusaTreeProposer
    from vllm_medusa.trees import chain

    hidden_size, vocab = 16, 50
    g = torch.Generator().manual_seed(0)
    heads = MedusaHeads(2, 1, hidden_size, vocab, dtype=torch.float32)
    heads.block_weight.data.normal_(0, 1.0, generator=g)
    proposer = MedusaTreeProposer.__new__(MedusaTreeProposer)
    proposer.heads, proposer.draft_projection, proposer.compute_logits = heads, None, None
    proposer.lm_head_weight = torch.randn(vocab, hidden_size, generator=g)
    proposer.embed_tokens, proposer.num_speculative_tokens = None, 5
    proposer.options = MedusaOptions(heads="unused", lookup=3)
    proposer.branch_stats = BranchStats(3, 2, 4)
    hidden = torch.randn(2, hidden_size, generator=g)
    step = MedusaTree.from_paths(chain(2))
    proposer.policy = TreeBudgetPolicy.for_tree(step, [[0.3], [0.2]])
    plain, _ = proposer.propose_trees(hidden, step, [2, 2])
    contexts = [np.array([7, 8, 9, 40, 41, 42, 43, 7, 8, 9]),  # a 3-token repeat: branch 40 41 42
                np.array([1, 2, 3, 4])]  # nothing repeats: the Medusa chain only
    drafts, trees = proposer.propose_trees(hidden, step, [2, 1], contexts=contexts, keys=["a", "b"])
    assert drafts == [[40, 41], plain[1][:1]] and trees[0].is_chain
    assert trees[0].ranks[1:] == [GRAFT_RANK, GRAFT_RANK]
    assert list(proposer.branch_stats._pending) == ["a"]
    proposer.forget("a")
    assert not proposer.branch_stats._pending


def test_replayed_acceptance_takes_the_longer_of_heads_and_lookup():
    import torch

    from vllm_medusa.train.metrics import MISS, LookupReplay, simulated_acceptance

    answer = [1, 2, 3, 4, 1, 2, 3, 4]
    ranks = torch.full((len(answer), 2), MISS)  # the heads never guess right
    replay = LookupReplay([[1, 2, 3, 4]], answer)
    assert simulated_acceptance(ranks, [(0,), (0, 0)], [len(answer)]) == 1.0
    # step 1 emits answer[0] (no repeated 2-gram yet); step 2 emits answer[1] and the branch
    # 3 4 1 2 3 4 (the prompt's continuation, repeated with its period) up to the answer's end
    assert simulated_acceptance(ranks, [(0,), (0, 0)], [len(answer)], replay) == 8 / 2
    ranks[:, 0] = 0  # head 0 always right: the tree's chain of 1 wins at step 1
    assert simulated_acceptance(ranks, [(0,)], [len(answer)], replay) == 8 / 2
