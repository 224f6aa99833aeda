"""The tree walk against small reference implementations: greedy equals sequential greedy, sampling
is an exact sample of the base model (chi-square test), typical acceptance follows its rule."""

import random

import pytest
import torch
from scipy.stats import chisquare

from vllm_medusa.trees import MedusaTree
from vllm_medusa.verification import TypicalAcceptance, pack_outputs, walk_trees

V = 6
TREE = MedusaTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])


def toy_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed 'base model': next-token logits as a function of the whole prefix."""
    g = torch.Generator().manual_seed(hash(prefix) % (2**31))
    return torch.randn(V, generator=g) * 2


def tree_inputs(prefix, drafts_by_path):
    """Logits of every tree row (the model sees the root's prefix plus the row's ancestors)."""
    rows = [()] + list(TREE.paths)
    tokens = [drafts_by_path[p] for p in TREE.paths]
    path_tokens = {(): ()}
    for p, t in zip(TREE.paths, tokens):
        path_tokens[p] = path_tokens[p[:-1]] + (t,)
    logits = torch.stack([toy_logits(prefix + path_tokens[r]) for r in rows])
    return logits, tokens


def random_drafts(rng):
    # Node (i1..id) holds head d-1's i_d-th guess: same token for the same (depth, rank).
    guesses = {(d, r): rng.randrange(V) for d in range(1, 4) for r in range(3)}
    return {p: guesses[(len(p), p[-1])] for p in TREE.paths}


def test_greedy_equals_sequential_greedy():
    rng = random.Random(0)
    accepted_lengths = []
    for trial in range(200):
        prefix = (rng.randrange(V),)
        logits, drafts = tree_inputs(prefix, random_drafts(rng))
        res = walk_trees([0], [TREE.children], [drafts],
                         lambda rows, hist: logits[rows].argmax(-1).tolist())
        seq, p = [], prefix
        for _ in range(len(res.tokens[0])):
            t = int(toy_logits(p).argmax())
            seq.append(t)
            p = p + (t,)
        assert res.tokens[0] == seq
        # accepted rows are the path of the emitted tokens
        rows = res.accepted_rows[0]
        assert [drafts[r - 1] for r in rows] == seq[:-1]
        assert all(TREE.parents[b] == a for a, b in zip([0] + rows, rows))
        accepted_lengths.append(len(rows))
    assert max(accepted_lengths) >= 2  # deep paths are exercised


def test_non_leftmost_branch_is_accepted():
    drafts = {p: 0 for p in TREE.paths}
    drafts[(1,)] = 3
    drafts[(1, 0)] = 4
    logits = torch.full((TREE.num_rows, V), -10.0)
    logits[0, 3] = 5  # root -> token 3 = node (1,) (row 2)
    logits[2, 4] = 5  # node (1,) -> token 4 = node (1, 0) (row 6)
    logits[6, 5] = 5  # bonus
    res = walk_trees([0], [TREE.children], [[drafts[p] for p in TREE.paths]],
                     lambda rows, hist: logits[rows].argmax(-1).tolist())
    assert res.tokens == [[3, 4, 5]] and res.accepted_rows == [[2, 6]] and res.last_rows == [6]


def test_batch_of_ragged_trees_and_plain_rows():
    small = TREE.truncate(2)
    logits = torch.zeros(1 + small.num_rows + TREE.num_rows, V)
    logits[0, 1] = 9  # request 0: no drafts
    logits[1, 2] = 9  # request 1 root -> token 2 = its node (0,)
    logits[2, 5] = 9
    starts = [0, 1, 1 + small.num_rows]
    logits[starts[2], 0] = 9  # request 2 root -> token 0, no child holds 0
    res = walk_trees(starts, [[[]], small.children, TREE.children], [[], [2, 3], [1] * 7],
                     lambda rows, hist: logits[rows].argmax(-1).tolist())
    assert res.tokens == [[1], [2, 5], [0]]
    out = pack_outputs(res.tokens, 8)
    assert out.shape == (3, 8) and out[1].tolist()[:3] == [2, 5, -1]


def test_sampling_is_exact():
    """Joint distribution of the first two emitted tokens equals sequential sampling."""
    torch.manual_seed(0)
    rng = random.Random(1)
    prefix = (2,)
    drafts = random_drafts(rng)
    drafts[(0,)] = int(toy_logits(prefix).argmax())  # make acceptance likely
    logits, dr = tree_inputs(prefix, drafts)
    probs = torch.softmax(logits, -1)
    gen = torch.Generator().manual_seed(123)
    counts = torch.zeros(V, V)
    n = 20000
    for _ in range(n):
        res = walk_trees([0], [TREE.children], [dr],
                         lambda rows, hist: [int(torch.multinomial(probs[r], 1, generator=gen)) for r in rows])
        toks = res.tokens[0]
        if len(toks) == 1:  # continue with the base model itself
            toks = toks + [int(torch.multinomial(torch.softmax(toy_logits(prefix + (toks[0],)), -1), 1, generator=gen))]
        counts[toks[0], toks[1]] += 1
    p1 = torch.softmax(toy_logits(prefix), -1)
    expected = torch.stack([p1[a] * torch.softmax(toy_logits(prefix + (a,)), -1) for a in range(V)]) * n
    keep = expected.flatten() > 5
    obs, exp = counts.flatten()[keep], expected.flatten()[keep]
    exp = exp * obs.sum() / exp.sum()
    # False-alarm rate of this check: 0.1%.
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_typical_acceptance_rule():
    typ = TypicalAcceptance(posterior_threshold=0.09, posterior_alpha=0.3)
    logits = torch.tensor([[4.0, 3.5, 0.0, 0.0, -1.0, -1.0]])
    chosen = typ.accept(logits, torch.tensor([1.0]), [[2, 1, 0]])
    assert chosen == [2]  # token 0 is the most probable qualifying candidate
    assert typ.accept(logits, torch.tensor([1.0]), [[4, 5]]) == [-1]
    assert typ.accept(logits, torch.tensor([0.0]), [[0]]) == [-1]  # greedy requests never use it


def _two_branch_logits():
    """TREE with node (1,) (row 2) holding 3 and node (1, 0) (row 6) holding 4; the greedy walk
    goes root -> row 2 -> row 6 and emits 3, 4, 5."""
    drafts = {p: 0 for p in TREE.paths}
    drafts[(1,)] = 3
    drafts[(1, 0)] = 4
    logits = torch.full((TREE.num_rows, V), -10.0)
    logits[0, 3] = 5
    logits[2, 4] = 5
    logits[6, 5] = 5
    return logits, [drafts[p] for p in TREE.paths]


@pytest.mark.parametrize("bad_row,cols,value,want_tokens,want_rows", [
    (2, [1], float("nan"), [3], []),  # the first accepted node is broken: root only
    (6, [1], float("inf"), [3, 4], [2]),  # a deeper one: up to its parent
    (6, list(range(V)), float("-inf"), [3, 4], [2]),  # nothing left to draw from
    (6, [0, 1, 2], float("-inf"), [3, 4, 5], [2, 6]),  # masked tokens (a grammar's): no fault
])
def test_non_finite_node_costs_only_its_request(bad_row, cols, value, want_tokens, want_rows):
    """One request's tree rows carry NaN/inf logits: that request backs off to the last node with
    usable logits (the token drawn there is its bonus); the other request in the batch is verified
    as if alone, and nothing raises."""
    good, drafts = _two_branch_logits()
    bad = good.clone()
    bad[bad_row, cols] = value
    logits = torch.cat([bad, good])
    starts = [0, TREE.num_rows]
    seen: list[torch.Tensor] = []

    def sample(rows, hist):
        seen.append(logits[rows])
        return logits[rows].argmax(-1).tolist()

    res = walk_trees(starts, [TREE.children] * 2, [drafts] * 2, sample, logits=logits)
    assert res.tokens == [want_tokens, [3, 4, 5]]
    assert res.accepted_rows == [want_rows, [2, 6]]
    assert res.last_rows == [want_rows[-1] if want_rows else 0, 6]
    for rows in seen:  # the sampler never saw a broken row
        assert torch.isfinite(rows[0].amax()), rows[0]


def test_tree_beyond_its_drafts_is_verified_as_no_draft():
    """A tree naming more rows than the request has drafts (the scheduler cut them) verifies that
    request like plain decoding; the batch's other request is untouched."""
    good, drafts = _two_branch_logits()
    logits = torch.cat([good, good])
    res = walk_trees([0, TREE.num_rows], [TREE.children] * 2, [drafts[:1], drafts],
                     lambda rows, hist: logits[rows].argmax(-1).tolist(), logits=logits)
    assert res.tokens == [[3], [3, 4, 5]] and res.accepted_rows == [[], [2, 6]]
