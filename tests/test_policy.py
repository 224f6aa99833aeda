"""The adaptive tree policy: shrinks with load, stops speculating when it cannot pay, corrects its
acceptance estimate from the engine, and follows measured step rates over its prior."""

from vllm_medusa.policy import StepCostModel, TreeBudgetPolicy, batch_bucket, candidate_trees
from vllm_medusa.trees import MC_SIM_7B_63, MedusaTree

ACC = [[0.6, 0.15, 0.05], [0.45, 0.1, 0.05], [0.35, 0.08, 0.04], [0.3, 0.05, 0.03]]


def policy(**kw):
    return TreeBudgetPolicy.for_tree(MedusaTree.from_paths(MC_SIM_7B_63), ACC, **kw)


def test_candidates_are_none_chains_and_prefixes():
    tree = MedusaTree.from_paths(MC_SIM_7B_63)
    cands = candidate_trees(tree)
    assert cands[0].num_nodes == 0
    chains = [c for c in cands if c.is_chain and c.num_nodes]
    assert [c.num_nodes for c in chains] == [1, 2, 3, 4]
    assert all(set(c.paths) <= set(tree.paths) for c in cands)
    assert cands[-1].num_nodes == 63
    assert len({frozenset(c.paths) for c in cands}) == len(cands)


def test_prior_shrinks_with_load_and_stops():
    p = policy()
    sizes = [p.prior_choice(b).num_nodes for b in (1, 2, 4, 8, 16, 64)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > 0 and sizes[-1] == 0
    for b in (1, 4, 16, 64):
        assert p.throughput(b, p.prior_choice(b)) >= p.throughput(b, p.candidates[0])


def test_fixed_tree_when_not_adaptive():
    assert policy(adaptive=False).choose(64).num_nodes == 63


def test_observed_acceptance_corrects_the_estimate():
    p = policy()
    before = p.prior_choice(1)
    for _ in range(p.refresh_every):
        p.observe(before, 0)  # the heads never hit
    assert p.prior_choice(1).num_nodes < before.num_nodes


def test_expensive_speculation_is_switched_off():
    p = policy(cost=StepCostModel(draft=1.0))
    assert p.prior_choice(1).num_nodes == 0


def run(p, batch, true_rate, steps):
    """Drive the policy with a simulated engine whose tokens/s per candidate is ``true_rate``."""
    chosen = []
    for _ in range(steps):
        tree = p.choose(batch)
        chosen.append(tree)
        rate = true_rate(tree)
        p.record_step(batch, tree, batch, batch / rate)
    return chosen


def test_measurements_override_a_wrong_prior():
    """The prior thinks 5-token steps are free; the hardware says speculation loses. The policy
    must end up not speculating, exploring within its budget on the way."""
    p = policy()
    assert p.prior_choice(1).num_nodes > 0
    chosen = run(p, 1, lambda t: 30.0 if t.num_nodes == 0 else 30.0 / (1 + 0.1 * t.num_nodes), 1000)
    # Converged within 500 steps; afterwards only re-probes of the neighbour (chain-1).
    assert sum(t.num_nodes != 0 for t in chosen[500:]) <= 50
    assert p.exploration()["fraction"] <= p.explore_budget + 0.002


def test_measurements_find_the_best_candidate_and_probes_stay_plausible():
    """A chain of 2 is fastest; the 63-node tree is never probed at batch 64."""
    p = policy()
    best = next(c for c in p.candidates if c.is_chain and c.num_nodes == 2)

    def rate(t):
        return 40.0 if t is best else 30.0 - 0.1 * t.num_nodes

    chosen = run(p, 1, rate, 400)
    assert sum(t is best for t in chosen[-100:]) >= 85
    big = run(p, 64, lambda t: 250.0 / (1 + t.num_nodes), 200)
    assert max(t.num_nodes for t in big) < 63
    assert sum(t.num_nodes == 0 for t in big[-50:]) >= 45


def test_batch_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 9, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 16, 32, 64]


def test_a_new_bucket_starts_from_what_other_buckets_measured():
    """Measurements at batch 1 correct the prior's ranking at batch 2 before batch 2 measures."""
    p = policy()
    best = next(c for c in p.candidates if c.is_chain and c.num_nodes == 1)
    run(p, 1, lambda t: 40.0 if t is best else 20.0, 300)
    assert p.choose(2) is best  # the first step of a bucket is never a probe


def test_a_one_off_stall_does_not_condemn_a_candidate():
    p = policy()
    none = p.candidates[0]
    for _ in range(p.min_samples):
        p.record_step(1, none, 1, 0.03)
    other = p.candidates[1]
    p.record_step(1, other, 2, 3.0)  # first use: 100x the usual step
    assert other not in [p.candidates[i] for i in p._buckets[1].arms]


def test_a_clear_loser_is_re_probed_rarely():
    """Batch 4: no speculation is 15% faster than a chain of 1 (which the prior favours) and ahead
    of the rest. After the first measurements, few steps re-check the chain."""
    p = policy()
    assert p.prior_choice(4).num_nodes == 1
    chosen = run(p, 4, lambda t: 120.0 if t.num_nodes == 0 else 104.0 - 4 * t.num_nodes, 1000)
    assert sum(t.num_nodes != 0 for t in chosen[300:]) <= 700 / 15
    assert sum(t.num_nodes != 0 for t in chosen[300:]) >= 1  # ... but still re-checked


def test_the_prior_rules_out_speculation_on_a_busy_batch():
    """Batch 16 on this hardware's cost model: the prior says no candidate that speculates can pay,
    so none is ever tried, whatever it would have measured."""
    p = policy()
    assert p.prior_choice(16).num_nodes == 0
    chosen = run(p, 16, lambda t: 230.0 if t.num_nodes == 0 else 200.0 / t.num_nodes, 1000)
    assert all(t.num_nodes == 0 for t in chosen)
    assert p.exploration()["explore_s"] == 0.0


def test_exploration_costs_at_most_its_budget():
    """Over the first 1000 steps at each batch size, steps lost to probes stay within 1% (plus one
    probe's worth) of the time decoding, even where the prior's ranking is wrong."""
    for batch, truth in ((1, lambda t: 30.0 if t.is_chain and t.num_nodes == 2 else 28.0 - 0.05 * t.num_nodes),
                         (4, lambda t: 100.0 if t.num_nodes == 0 else 95.0 - t.num_nodes),
                         (1, lambda t: 40.0 - abs(t.num_nodes - 8) * 0.3)):
        p = policy()
        run(p, batch, truth, 1000)
        e = p.exploration()
        assert e["explore_s"] <= p.explore_budget * e["elapsed_s"] + 0.05, (batch, e)


def test_no_speculation_without_a_clear_gain():
    p = policy()
    chain1 = p.candidates[1]
    chosen = run(p, 1, lambda t: 30.0 if t.num_nodes == 0 else (30.5 if t is chain1 else 10.0), 400)
    assert sum(t.num_nodes == 0 for t in chosen[-100:]) >= 90


def test_step_cost_model_from_start_up_measurements():
    """Measured forward times are interpolated (and extrapolated past the last point); the
    flat-then-linear summary finds the knee; a malformed profile is refused by name."""
    import pytest

    points = {1: 0.030, 2: 0.030, 4: 0.031, 8: 0.032, 16: 0.062, 32: 0.126}
    m = StepCostModel.fit(points, draft=0.002)
    assert m.cost(4) == pytest.approx(0.031) and m.cost(12) == pytest.approx(0.047)
    assert m.cost(64) == pytest.approx(0.254)  # last segment's slope
    assert 6 <= m.knee <= 9 and m.per_token == pytest.approx(0.004, rel=0.1)
    assert StepCostModel.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="points"):
        StepCostModel.from_dict({"points": [[1, 0.03], [1, 0.04]]})
    with pytest.raises(ValueError):
        StepCostModel.fit({1: 0.03, 2: 0.03})
    # A machine where every extra token is dear (no bf16 GEMMs in hardware): no speculation at batch 1.
    slow = StepCostModel.fit({1: 0.051, 2: 0.090, 4: 0.117, 8: 0.153, 16: 0.244, 32: 0.406}, draft=0.007)
    p = TreeBudgetPolicy.for_tree(MedusaTree.from_paths(MC_SIM_7B_63), [[0.38, 0.1], [0.19], [0.11]], cost=slow)
    assert p.prior_choice(1).num_nodes == 0


def test_the_prior_alone_speculates_only_for_a_clear_gain():
    """Unmeasured, a candidate the prior puts 5% ahead of no speculation is not taken (the prior
    is less sure than a measurement); once measured 5% ahead, it is."""
    p = policy()
    chain1 = next(c for c in p.candidates if c.is_chain and c.num_nodes == 1)
    p._prior = {(4, i): (105.0 if c is chain1 else 100.0 if c.num_nodes == 0 else 50.0)
                for i, c in enumerate(p.candidates)}
    assert p.choose(4).num_nodes == 0
    for _ in range(p.min_samples):
        p.record_step(4, chain1, 4, 4 / 105.0)
        p.record_step(4, p.candidates[0], 4, 4 / 100.0)
    assert p.choose(4) is chain1


def test_tree_pass_fitted_from_start_up_measurements():
    """The tree-pass terms are recovered from (requests, nodes) timings, never negative, and
    survive a round trip; a prior that knows the tree pass is dear keeps to chains."""
    import pytest

    true = StepCostModel(tree_pass=0.001, tree_per_request=0.005, per_node=0.0001)
    shapes = [(1, 4), (1, 16), (2, 4), (2, 16), (4, 4), (4, 16), (8, 16)]
    m = StepCostModel().fit_tree_pass({s: true.tree_pass_cost(*s) for s in shapes})
    assert (m.tree_pass, m.tree_per_request, m.per_node) == pytest.approx((0.001, 0.005, 0.0001), rel=1e-6)
    assert StepCostModel.from_dict(m.to_dict()) == m
    # Cheaper per request at larger batches than a line through the origin says: no negative term.
    bent = StepCostModel().fit_tree_pass({(1, 4): 0.0066, (1, 16): 0.0080, (4, 4): 0.0171, (4, 16): 0.0259})
    assert min(bent.tree_pass, bent.tree_per_request, bent.per_node) >= 0
    assert bent.tree_pass_cost(1, 16) == pytest.approx(0.008, rel=0.25)
    # A profile written before the per-request term: its tree_pass was the whole tree-pass cost.
    old = StepCostModel.from_dict({"base": 0.03, "tree_pass": 0.005, "per_node": 0.0006})
    assert old.tree_pass_cost(1, 4) == pytest.approx(0.005 + 0.0024)
    with pytest.raises(ValueError, match="tree-pass"):
        StepCostModel().fit_tree_pass({(1, 4): 0.006, (1, 16): 0.008})
    flat = {1: 0.045, 2: 0.046, 4: 0.047, 8: 0.049, 16: 0.060, 32: 0.080}
    cheap = StepCostModel.fit(flat, draft=0.003, tree_pass=0.0, tree_per_request=0.0, per_node=0.0)
    dear = StepCostModel.fit(flat, draft=0.003, tree_pass=0.0, tree_per_request=0.040, per_node=0.001)
    tree = MedusaTree.from_paths(MC_SIM_7B_63)
    assert not TreeBudgetPolicy.for_tree(tree, ACC, cost=cheap).prior_choice(1).is_chain
    assert TreeBudgetPolicy.for_tree(tree, ACC, cost=dear).prior_choice(1).is_chain
