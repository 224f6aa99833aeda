"""medusa_tree in vLLM's compiled mode (``enforce_eager=False``: torch.compile of the model; on a GPU
also piecewise CUDA graphs, whose pieces end at every attention op where the tree pass runs).

On CPU there are no CUDA graphs, but the compiled model must still see the tree rows' positions and
the tree attention exactly as the eager one does: greedy float32 output of a branching tree with the
prompt-lookup branch equals plain compiled decoding.
"""

from __future__ import annotations

import pytest

from tests.conftest import shutdown_llm
from tests.engine_checks import first_difference

pytestmark = pytest.mark.engine

MAX_LEN = 512


def _generate(llm, prompts, max_tokens=64):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_compiled_branching_tree_equals_plain_compiled(demo_model, demo_heads):
    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_medusa.data import mtbench_prompts

    prompts = mtbench_prompts(AutoTokenizer.from_pretrained(str(demo_model)), n=6)
    plain = LLM(model=str(demo_model), dtype="float32", max_model_len=MAX_LEN, enforce_eager=False, seed=0)
    expected = _generate(plain, prompts)
    shutdown_llm(plain)
    medusa = LLM(model=str(demo_model), dtype="float32", max_model_len=MAX_LEN, enforce_eager=False, seed=0,
                 speculative_config={"method": "medusa_tree", "model": str(demo_heads), "tree": "small",
                                     "adaptive": False, "lookup": 8})
    try:
        got = _generate(medusa, prompts)
        stats = medusa.collective_rpc("medusa_stats")[0]
    finally:
        shutdown_llm(medusa)
    bad = {i: first_difference(g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e}
    assert not bad, f"compiled medusa_tree differs from plain compiled (request: first token): {bad}"
    assert stats["non_leftmost"] > 0, "branches off the top-1 chain should be accepted"
    assert stats["mean_acceptance_length"] > 1.3
