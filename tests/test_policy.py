"""The adaptive tree-size policy: shrinks with load, stops speculating when it cannot pay, and
corrects its acceptance estimate from what the engine observes."""

from vllm_medusa.policy import StepCostModel, TreeBudgetPolicy
from vllm_medusa.trees import MC_SIM_7B_63, MedusaTree

ACC = [[0.6, 0.15, 0.05], [0.45, 0.1, 0.05], [0.35, 0.08, 0.04], [0.3, 0.05, 0.03]]


def policy(**kw):
    return TreeBudgetPolicy.for_tree(MedusaTree.from_paths(MC_SIM_7B_63), ACC, **kw)


def test_tree_shrinks_with_load_and_stops():
    p = policy()
    sizes = [p.num_nodes(b) for b in (1, 2, 4, 8, 16, 64)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > 0 and sizes[-1] == 0
    for b in (1, 4, 16, 64):
        assert p.throughput(b, p.num_nodes(b)) >= p.throughput(b, 0)


def test_fixed_tree_when_not_adaptive():
    assert policy(adaptive=False).num_nodes(64) == 63


def test_observed_acceptance_corrects_the_estimate():
    p = policy()
    before = p.num_nodes(1)
    for _ in range(p.refresh_every):
        p.observe(before, 0)  # the heads never hit
    assert p.num_nodes(1) < before


def test_expensive_speculation_is_switched_off():
    p = policy(cost=StepCostModel(draft=1.0))
    assert p.num_nodes(1) == 0
