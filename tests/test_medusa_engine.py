"""medusa_tree inside the real vLLM engine on the demo model with its trained heads.

Losslessness is checked in float32: in bf16, plain decoding itself changes its argmax on near-ties
when the batch shape changes (a logit ulp is 0.125 at these magnitudes), which would hide real bugs
behind noise. Two engines for the whole module: plain decoding (the reference) and medusa_tree with
a KV cache small enough to force preemption, and the prompt-lookup branch on (opt-in).
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from tests.conftest import shutdown_llm
from tests.engine_checks import (MAX_MODEL_LEN, first_difference, generate_continuous,
                                 generate_tokens, metric, same_distribution_pvalue,
                                 sampling_distributions, workload)

pytestmark = pytest.mark.engine

TREE = "mc_sim_7b_63"  # a wide tree: many branches are verified and accepted
KV_BLOCKS = 12  # far less than 18 requests need at once: forces preemption


@pytest.fixture(scope="module")
def prompts_and_params(demo_model) -> tuple[list[str], list[Any]]:
    return workload(str(demo_model))


@pytest.fixture(scope="module")
def plain32(demo_model, prompts_and_params) -> Iterator[tuple[Any, list[list[int]]]]:
    from vllm import LLM

    llm = LLM(model=str(demo_model), dtype="float32", max_model_len=MAX_MODEL_LEN,
              enforce_eager=True, seed=0)
    prompts, params = prompts_and_params
    expected = generate_tokens(llm, prompts, params)
    yield llm, expected
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def medusa32(demo_model, demo_heads, plain32) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(model=str(demo_model), dtype="float32", max_model_len=MAX_MODEL_LEN,
              enforce_eager=True, seed=0, disable_log_stats=False,
              num_gpu_blocks_override=KV_BLOCKS,
              speculative_config={"method": "medusa_tree", "model": str(demo_heads), "tree": TREE,
                                  "adaptive": False, "lookup": 8})
    yield llm
    shutdown_llm(llm)


def _assert_same(got: list[list[int]], expected: list[list[int]]) -> None:
    bad = {i: first_difference(g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e}
    assert not bad, f"requests differ from plain greedy (request: first differing token): {bad}"


def test_greedy_batch_equals_plain_with_preemption(medusa32, plain32, prompts_and_params):
    prompts, params = prompts_and_params
    _, expected = plain32
    got = generate_tokens(medusa32, prompts, params)
    _assert_same(got, expected)
    assert len(got[-2]) < 200, "the long request should end by max_model_len"
    assert any(len(g) < p.max_tokens for g, p in zip(got[:16], params[:16]) if p.stop), \
        "a stop string should end a request"
    assert metric(medusa32, "vllm:num_preemptions") > 0, "the small KV cache should force preemption"


def test_greedy_continuous_batching_equals_plain(medusa32, plain32, prompts_and_params):
    prompts, params = prompts_and_params
    _, expected = plain32
    _assert_same(generate_continuous(medusa32, prompts, params), expected)


def test_engine_reports_acceptance_and_branches(medusa32):
    drafts = metric(medusa32, "vllm:spec_decode_num_drafts")
    accepted = metric(medusa32, "vllm:spec_decode_num_accepted_tokens")
    assert drafts > 0
    assert 1 + accepted / drafts > 1.3, "mean acceptance length should be well above 1"
    stats = medusa32.collective_rpc("medusa_stats")[0]
    assert stats["non_leftmost"] > 0, "some accepted paths should leave the top-1 branch"
    assert stats["accepted_per_depth"][0] >= stats["accepted_per_depth"][-1]
    assert stats["lookup_accepted"] > 0, "the prompt-lookup branch should be accepted somewhere"


def test_engine_acceptance_matches_offline_replay(medusa32, demo_model, demo_heads, tmp_path):
    """The engine's mean acceptance length (its fixed wide tree plus the prompt-lookup branch) is
    what the offline replay of the same tree over the engine's own answers predicts, within 5%:
    the engine offers and accepts what the heads and the branch hold, no less."""
    import json

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.train.evaluate import replay_answers
    from vllm_medusa.trees import resolve_tree

    prompts = mtbench_prompts(AutoTokenizer.from_pretrained(str(demo_model)), n=24)[16:]
    before = medusa32.collective_rpc("medusa_stats")[0]
    outs = medusa32.generate(prompts, SamplingParams(temperature=0, max_tokens=128), use_tqdm=False)
    after = medusa32.collective_rpc("medusa_stats")[0]
    steps = after["tree_steps"] - before["tree_steps"]
    engine = 1 + (after["accepted_tokens"] - before["accepted_tokens"]) / steps
    records = tmp_path / "answers.jsonl"
    records.write_text("".join(json.dumps({"id": f"a{i}", "prompt_token_ids": list(o.prompt_token_ids),
                                           "output_token_ids": list(o.outputs[0].token_ids)}) + "\n"
                               for i, o in enumerate(outs)))
    tree = resolve_tree(TREE, num_heads=5).paths
    replay = replay_answers(demo_model, demo_heads, records, tmp_path, tree, lookup=8)
    assert abs(engine - replay["tree_and_lookup"]) <= 0.05 * replay["tree_and_lookup"], (engine, replay)


def test_sampling_matches_plain_distribution(medusa32, plain32, demo_model):
    """Per-position token distributions at temperature 0.8 / top-p 0.95, 400 samples per engine.
    Each position is a chi-square homogeneity test at alpha = 1e-3; with 6 positions the chance of
    a false alarm is below 0.6%."""
    from transformers import AutoTokenizer

    from vllm_medusa.data import chat_prompt

    plain, _ = plain32
    prompt = chat_prompt(AutoTokenizer.from_pretrained(str(demo_model)), "Tell me a short story.")
    before = medusa32.collective_rpc("medusa_stats")[0]
    a = sampling_distributions(medusa32, prompt, n=400, length=6, seed0=0)
    after = medusa32.collective_rpc("medusa_stats")[0]
    b = sampling_distributions(plain, prompt, n=400, length=6, seed0=10_000)
    pvalues = [same_distribution_pvalue(x, y) for x, y in zip(a, b)]
    assert min(pvalues) > 1e-3, pvalues
    assert after["accepted_tokens"] > before["accepted_tokens"], "sampling should accept drafts"


def test_structured_output_is_drafted_and_equals_plain(medusa32, plain32, demo_model):
    """A JSON-schema request gets drafts (the heads' top-1 chain, validated and masked by vLLM's
    grammar machinery per position) and its greedy output is plain decoding's."""
    import json

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_medusa.data import chat_prompt

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"]}
    params = SamplingParams(temperature=0, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(json=schema))
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    prompts = [chat_prompt(tok, f"Describe {who} as a JSON object with name, age and city.")
               for who in ("a baker from Lyon", "a sailor aged 40")]
    before = medusa32.collective_rpc("medusa_stats")[0]
    got = medusa32.generate(prompts, params, use_tqdm=False)
    after = medusa32.collective_rpc("medusa_stats")[0]
    want = plain32[0].generate(prompts, params, use_tqdm=False)
    _assert_same([list(o.outputs[0].token_ids) for o in got], [list(o.outputs[0].token_ids) for o in want])
    for o in got:
        assert set(json.loads(o.outputs[0].text)) >= {"name", "age", "city"}
    assert after["tree_steps"] > before["tree_steps"] and after["accepted_tokens"] > before["accepted_tokens"]


def test_same_seed_same_output(medusa32):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=48)
    first = generate_tokens(medusa32, ["Write a haiku about rain."], [params])
    second = generate_tokens(medusa32, ["Write a haiku about rain."], [params])
    assert first == second


def test_logprobs_follow_the_emitted_tokens(medusa32, plain32):
    """Logprobs of several tokens per step come from the tree level that drew each token."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    prompt = ["1, 2, 3, 4, 5, 6, 7, 8,"]
    got = medusa32.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    want = plain32[0].generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert list(got.token_ids) == list(want.token_ids)
    for tok, g, w in zip(got.token_ids, got.logprobs, want.logprobs):
        assert tok in g and g[tok].rank == 1
        assert abs(g[tok].logprob - w[tok].logprob) < 1e-3


def test_greedy_logit_bias_equals_plain(medusa32, plain32, prompts_and_params):
    """Greedy with logit_bias (a ban on each request's usual first token and on its most frequent
    one, a push for two of its later tokens; each request its own biases, some none) is plain
    greedy with the same biases: bias changes the argmax, so it must reach every tree level."""
    from collections import Counter

    from vllm import SamplingParams

    prompts, _ = prompts_and_params
    _, unbiased = plain32
    params = []
    for i in range(8):
        out = unbiased[i]
        if i % 4 == 3:
            params.append(SamplingParams(temperature=0, max_tokens=40))
            continue
        common = Counter(out).most_common(1)[0][0]
        bias = {out[0]: -100.0, common: -100.0, out[6]: 4.0, out[12]: 3.0}
        params.append(SamplingParams(temperature=0, max_tokens=40, logit_bias=bias))
    before = medusa32.collective_rpc("medusa_stats")[0]
    got = generate_tokens(medusa32, prompts[:8], params)
    after = medusa32.collective_rpc("medusa_stats")[0]
    want = generate_tokens(plain32[0], prompts[:8], params)
    _assert_same(got, want)
    for i, p in enumerate(params):
        if p.logit_bias:
            assert got[i][:40] != unbiased[i][:40] and unbiased[i][0] not in got[i], i
    assert after["accepted_tokens"] > before["accepted_tokens"], "biased requests should accept drafts"


@pytest.mark.parametrize("name,sampling", [
    ("min_p", {"temperature": 1.0, "top_p": 1.0, "min_p": 0.15}),
    ("logit_bias", {"temperature": 0.9, "top_p": 1.0, "logit_bias": {}}),
])
def test_logits_processors_match_plain_distribution(name, sampling, medusa32, plain32, demo_model):
    """min_p and logit_bias under sampling: per-position token distributions of medusa_tree and
    plain decoding, 300 samples each, a chi-square homogeneity test per position at alpha = 1e-3
    (4 positions: a false alarm below 0.4%). The logit_bias case bans plain's most likely first
    token and pushes its fourth most likely one."""
    from transformers import AutoTokenizer

    from vllm_medusa.data import chat_prompt

    plain, _ = plain32
    prompt = chat_prompt(AutoTokenizer.from_pretrained(str(demo_model)), "Tell me a short story.")
    if name == "logit_bias":
        first = plain.generate([prompt], __import__("vllm").SamplingParams(
            temperature=0, max_tokens=1, logprobs=4), use_tqdm=False)[0].outputs[0].logprobs[0]
        ranked = sorted(first, key=lambda t: first[t].rank)
        sampling = {**sampling, "logit_bias": {ranked[0]: -100.0, ranked[3]: 2.0}}
    before = medusa32.collective_rpc("medusa_stats")[0]
    a = sampling_distributions(medusa32, prompt, n=300, length=4, seed0=0, **sampling)
    after = medusa32.collective_rpc("medusa_stats")[0]
    b = sampling_distributions(plain, prompt, n=300, length=4, seed0=10_000, **sampling)
    pvalues = [same_distribution_pvalue(x, y) for x, y in zip(a, b)]
    assert min(pvalues) > 1e-3, pvalues
    assert after["accepted_tokens"] > before["accepted_tokens"], "sampling should accept drafts"


def test_min_tokens_and_bad_words_equal_plain(medusa32, plain32, demo_model, prompts_and_params):
    """Greedy with min_tokens (short answers, whose end of stream min_tokens holds back: the
    boundary often falls inside a tree step, where the tokens the step already emitted count) and
    with multi-token bad words (banned after their prefix, which the step may have emitted) is
    plain greedy."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_medusa.data import chat_prompt

    tok = AutoTokenizer.from_pretrained(str(demo_model))
    questions = ["What is 2 + 2? Answer with the number only.", "Name one colour. One word.",
                 "What is the capital of France? One word.", "Is ice cold? Answer yes or no."]
    prompts, params = [], []
    for q in questions:
        for k in (2, 3, 4, 5, 6, 8):
            prompts.append(chat_prompt(tok, q))
            params.append(SamplingParams(temperature=0, max_tokens=40, min_tokens=k))
    story = chat_prompt(tok, "Tell me a short story.")
    for words in (["upon a time"], ["of the", "in the", "was a"], ["Once upon"]):
        prompts.append(story)
        params.append(SamplingParams(temperature=0, max_tokens=48, bad_words=words))
    workload_prompts, _ = prompts_and_params
    for p in workload_prompts[:4]:
        prompts.append(p)
        params.append(SamplingParams(temperature=0, max_tokens=48, bad_words=["of the", "in the", "is a"]))
    before = medusa32.collective_rpc("medusa_stats")[0]
    got = generate_tokens(medusa32, prompts, params)
    after = medusa32.collective_rpc("medusa_stats")[0]
    want = generate_tokens(plain32[0], prompts, params)
    _assert_same(got, want)
    assert all(len(g) >= p.min_tokens for g, p in zip(got, params))
    assert after["accepted_tokens"] > before["accepted_tokens"]


def test_path_conditioned_heads_are_drafted_and_lossless(demo_model, demo_heads, plain32, prompts_and_params,
                                                        tmp_path):
    """Heads marked path-conditioned (the demo heads' weights, so head 0 guesses as well as before)
    are drafted depth by depth in the engine: a branching tree with accepted branches, and greedy
    output equal to plain greedy."""
    import json
    import shutil

    from vllm import LLM

    heads = tmp_path / "path-heads"
    shutil.copytree(demo_heads, heads)
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**config, "token_conditioning": "path"}))
    llm = LLM(model=str(demo_model), dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True,
              seed=0, speculative_config={"method": "medusa_tree", "model": str(heads), "tree": "small",
                                          "adaptive": False})
    try:
        prompts, params = prompts_and_params
        _assert_same(generate_tokens(llm, prompts, params), plain32[1])
        stats = llm.collective_rpc("medusa_stats")[0]
        assert stats["accepted_per_depth"][1] > 0 and stats["non_leftmost"] > 0, stats
        assert "path-conditioned" in stats["heads"], stats["heads"]
    finally:
        shutdown_llm(llm)
