"""The adaptive policy's profile on disk: a fresh policy (and a fresh engine) given a saved profile
starts with the converged choice; a corrupt, foreign or unwritable cache never stops anything."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vllm_medusa.policy import StepCostModel, TreeBudgetPolicy, candidate_name
from vllm_medusa.profile_store import FORMAT, ProfileStore, files_digest
from vllm_medusa.trees import MC_SIM_7B_63, MedusaTree

ACC = [[0.6, 0.15, 0.05], [0.45, 0.1, 0.05], [0.35, 0.08, 0.04], [0.3, 0.05, 0.03]]
KEY = {"model": "m", "heads": "h", "hardware": "cpu:x:2 cpus", "vllm": "0.32.0"}


def policy() -> TreeBudgetPolicy:
    return TreeBudgetPolicy.for_tree(MedusaTree.from_paths(MC_SIM_7B_63), ACC, cost=StepCostModel())


def truth(t: MedusaTree) -> float:
    """A machine where a chain of 3 is fastest at batch 1 and no speculation at batch 8+."""
    if t.num_nodes == 0:
        return 1.0
    return 1.25 - 0.08 * abs(t.num_nodes - 3) - (0.05 if not t.is_chain else 0.0)


def drive(p: TreeBudgetPolicy, batch: int, steps: int) -> list[MedusaTree]:
    chosen = []
    for _ in range(steps):
        tree = p.choose(batch)
        chosen.append(tree)
        rate = 30.0 * batch * (truth(tree) if batch < 8 else (1.0 if tree.num_nodes == 0 else 0.6))
        p.record_step(batch, tree, batch, batch / rate)
    return chosen


def test_a_fresh_policy_given_a_saved_profile_starts_converged(tmp_path: Path) -> None:
    warm = policy()
    for batch in (1, 2, 4, 16):
        drive(warm, batch, 3000)
    converged = {b: candidate_name(warm.candidates[warm._buckets[b].best]) for b in (1, 2, 4, 16)}
    assert converged[1] == "chain-3" and converged[16] == "none"
    store = ProfileStore(KEY, tmp_path)
    assert store.save(warm.cost.to_dict(), warm.state_dict())

    saved = ProfileStore(KEY, tmp_path).load()
    assert saved is not None
    fresh = policy()
    fresh.load_state_dict(saved["policy"])
    fresh.set_cost(StepCostModel.from_dict(saved["cost"]))
    for b in (1, 2, 4, 16):
        assert candidate_name(fresh.choose(b)) == converged[b], b
    # ... and keeps it: only re-probes within the exploration budget.
    chosen = [candidate_name(t) for t in drive(fresh, 1, 500)]
    assert chosen.count(converged[1]) >= 0.9 * len(chosen)
    assert fresh.exploration()["fraction"] <= fresh.explore_budget + 0.002


def test_corrupt_or_foreign_files_are_ignored(tmp_path: Path, caplog) -> None:
    store = ProfileStore(KEY, tmp_path)
    assert store.path is not None
    caplog.set_level(logging.WARNING)
    store.path.write_text("{not json")
    assert store.load() is None
    assert "ignored" in caplog.text
    store.path.write_text(json.dumps({"format": FORMAT, "key": {**KEY, "hardware": "other"},
                                      "cost": {}, "policy": {}}))
    assert store.load() is None
    store.path.write_text(json.dumps({"format": FORMAT + 1, "key": KEY}))
    assert store.load() is None
    # A well-formed file whose contents do not make a policy: the policy says so, unchanged.
    p = policy()
    with pytest.raises(ValueError, match="malformed policy state"):
        p.load_state_dict({"scale": 1.0, "buckets": {"1": {"chain-1": "x"}}})
    with pytest.raises(ValueError, match="malformed policy state"):
        p.load_state_dict({"scale": -3, "buckets": {}})
    assert p._buckets == {}
    with pytest.raises(ValueError, match="non-negative"):
        StepCostModel.from_dict({"base": "fast"})


def test_writes_are_atomic_and_failures_harmless(tmp_path: Path) -> None:
    store = ProfileStore(KEY, tmp_path / "profiles")
    assert store.save({"base": 0.03}, {"scale": 1.0, "buckets": {}})
    assert [p.name for p in (tmp_path / "profiles").iterdir()] == [store.path.name]  # no temp left
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not ProfileStore(KEY, blocked / "sub").save({}, {})  # cannot create: logged, no raise


def test_cache_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_MEDUSA_CACHE_DIR", "off")
    store = ProfileStore(KEY)
    assert store.path is None and store.load() is None and not store.save({}, {})


def test_heads_digest_follows_the_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "w.safetensors").write_bytes(b"a" * 100)
    before = files_digest(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"b" * 100)
    assert files_digest(str(tmp_path)) != before


@pytest.mark.engine
def test_a_fresh_engine_given_a_saved_profile_decodes_with_its_choice(demo_model, demo_heads,
                                                                      tmp_path, monkeypatch) -> None:
    """Engine 1 saves its profile; the profile is edited so that a chain of 2 is by far the best
    at batch 1 (what no prior would pick); engine 2 decodes with a chain of 2 from its first step."""
    from vllm import LLM, SamplingParams

    from tests.conftest import shutdown_llm

    monkeypatch.setenv("VLLM_MEDUSA_CACHE_DIR", str(tmp_path))
    kw = dict(model=str(demo_model), max_model_len=1024, enforce_eager=True, seed=0,
              speculative_config={"method": "medusa_tree", "model": str(demo_heads)})
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(**kw)
    llm.generate(["Name three colours."], params, use_tqdm=False)
    shutdown_llm(llm)
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    # The first engine of a setup measured its step costs at start-up (forward passes of 1..32 tokens).
    assert [t for t, _ in data["cost"]["points"]] == [1, 2, 4, 8, 16, 32]
    assert all(sec > 0 for _, sec in data["cost"]["points"]) and data["cost"]["draft"] > 0
    # ... and the tree pass of its (branching) tree, fitted per request and node, not the defaults.
    default = StepCostModel()
    fitted = StepCostModel.from_dict(data["cost"])
    assert (fitted.tree_pass, fitted.tree_per_request, fitted.per_node) != (
        default.tree_pass, default.tree_per_request, default.per_node)
    assert fitted.tree_pass_cost(1, 16) > 0
    data["policy"]["buckets"] = {"1": {"none": [64.0, 2.0, 64], "chain-1": [90.0, 2.2, 64],
                                       "chain-2": [160.0, 2.2, 64], "chain-3": [100.0, 2.6, 64]}}
    files[0].write_text(json.dumps(data))

    llm = LLM(**kw)
    try:  # a few steps: later ones follow what this engine measures itself
        llm.generate(["Write a haiku about autumn."], SamplingParams(temperature=0, max_tokens=8,
                                                                    ignore_eos=True), use_tqdm=False)
        stats = llm.collective_rpc("medusa_stats")[0]
    finally:
        shutdown_llm(llm)
    arms = stats["policy"]["1"]
    assert arms["chain-2"]["steps"] > 64, arms  # decoded with it, and nothing else
    assert {k: v["steps"] for k, v in arms.items() if k != "chain-2"} == {"none": 64, "chain-1": 64,
                                                                          "chain-3": 64}, arms
    assert stats["tree_steps"] > 0 and stats["nodes"] <= 2 * stats["tree_steps"]
    assert stats["exploration"]["explore_s"] == 0.0
