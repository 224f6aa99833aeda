"""medusa_tree with ``tensor_parallel_size=2`` (vLLM's multiprocess executor, two CPU ranks).

Each rank holds half of every attention layer's heads and of the vocab projection, runs the tree
pass over its own heads, compacts its own KV cache, and must verify the drafts the scheduler got
from rank 0 with the same trees: greedy float32 output must equal plain TP=2 decoding, with
branching trees, the prompt-lookup branch, a draft vocabulary (the heads' ``token_map``, whose
projection is gathered from the ranks' slices) and the adaptive policy (whose timings differ per
rank). The demo model's 9 attention heads do not split in two, so the tiny random Llama (4 heads,
2 KV heads) is the base; its greedy answers loop, which the drafts accept.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shutdown_llm
from tests.engine_checks import first_difference

pytestmark = pytest.mark.engine

MAX_LEN = 512
PROMPTS = ["The quick brown fox", "1, 2, 3, 4, 5,", "Once upon a time there was",
           "def fibonacci(n):", "Paris is the capital of", "a b c d e f g"]


@pytest.fixture(scope="module", autouse=True)
def one_core_per_rank():
    """vLLM's CPU workers bind their threads per NUMA node by default and refuse two ranks on one
    node: bind rank 0 to core 0 and rank 1 to core 1 (``|`` separates the ranks)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        yield


@pytest.fixture(scope="module")
def tiny_heads(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
               plain_tp2: list[list[int]]) -> dict[str, Path]:
    """Heads for the tiny model with the base's lm_head, fitted in a few seconds to its own greedy
    answers to the test prompts (a random model has nothing else to learn from), so that drafts
    are accepted, along the top-1 chain and off it: one set over a draft vocabulary (token_map:
    the answers' tokens and as many others), one with the same blocks over the whole vocabulary."""
    import torch
    from transformers import AutoTokenizer

    from vllm_medusa.heads import MedusaHeads, save_medusa_heads
    from vllm_medusa.train.features import hidden_states_for, load_backbone
    from vllm_medusa.train.features import IGNORE
    from vllm_medusa.train.trainer import medusa_loss

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    records = [{"prompt_token_ids": tok(p)["input_ids"], "output_token_ids": out}
               for p, out in zip(PROMPTS, plain_tp2)]
    decoder, model = load_backbone(tiny_model, dtype=torch.float32)
    hidden = torch.cat(hidden_states_for(decoder, records))
    num_heads = 4
    targets = torch.cat([torch.tensor([[out[j + k + 1] if j + k + 1 < len(out) else IGNORE
                                        for k in range(num_heads)] for j in range(len(out))])
                         for out in plain_tp2])
    used = torch.unique(torch.tensor([t for out in plain_tp2 for t in out]))
    others = torch.randperm(49152)[: used.numel()]
    token_map = torch.unique(torch.cat([used, others]))
    heads = MedusaHeads(num_heads, 1, 128, 49152, shared_lm_head=True, token_map=token_map,
                        dtype=torch.float32)
    lm_head = model.lm_head.weight.detach()
    # The heads' logits run over the draft vocabulary: targets become indices into it.
    targets = torch.where(targets == IGNORE, IGNORE, torch.searchsorted(token_map, targets.clamp(min=0)))
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(40):
        loss, accs = medusa_loss(heads(hidden, lm_head), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("tiny heads fitted: top-1 per head", [round(a, 2) for a in accs])
    full = MedusaHeads(num_heads, 1, 128, 49152, shared_lm_head=True, dtype=torch.float32)
    full.load_state_dict({k: v for k, v in heads.state_dict().items() if k != "token_map"})
    return {"draft-vocab": save_medusa_heads(heads, tmp_path_factory.mktemp("draft-vocab"), str(tiny_model)),
            "full": save_medusa_heads(full, tmp_path_factory.mktemp("full"), str(tiny_model))}


def _generate(llm, max_tokens: int = 96) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _llm(model: Path, **kw):
    from vllm import LLM

    return LLM(model=str(model), dtype="float32", max_model_len=MAX_LEN, tensor_parallel_size=2,
               enforce_eager=True, seed=0, **kw)


@pytest.fixture(scope="module")
def plain_tp2(tiny_model: Path) -> list[list[int]]:
    llm = _llm(tiny_model)
    try:
        return _generate(llm)
    finally:
        shutdown_llm(llm)


@pytest.mark.parametrize("heads,options", [
    ("draft-vocab", {"tree": "small", "adaptive": False, "lookup": 8}),
    ("full", {"adaptive": True, "lookup": 8}),
], ids=["draft-vocab-small-tree-lookup", "full-vocab-adaptive"])
def test_tp2_equals_plain_tp2(tiny_model, tiny_heads, plain_tp2, heads, options):
    llm = _llm(tiny_model, speculative_config={"method": "medusa_tree", "model": str(tiny_heads[heads]),
                                               **options})
    try:
        got = _generate(llm)
        per_rank = llm.collective_rpc("medusa_stats")
    finally:
        shutdown_llm(llm)
    bad = {i: first_difference(g, e) for i, (g, e) in enumerate(zip(got, plain_tp2)) if g != e}
    assert not bad, f"TP=2 medusa_tree differs from plain TP=2 (request: first token): {bad}"
    assert len(per_rank) == 2
    # Both ranks verified the same trees and accepted the same rows.
    keys = ("steps", "tree_steps", "accepted_tokens", "nodes", "accepted_per_depth", "non_leftmost",
            "lookup_accepted")
    assert [{k: s[k] for k in keys} for s in per_rank][0] == {k: per_rank[1][k] for k in keys}
    stats = per_rank[0]
    if not options["adaptive"]:
        assert stats["tree_steps"] > 0 and stats["mean_acceptance_length"] > 1.3, stats
        assert stats["non_leftmost"] > 0, "branches off the top-1 chain should be accepted"
