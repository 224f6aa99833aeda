"""Workloads shared by the engine tests (CPU here, CUDA where present): greedy losslessness under
mixed stops, preemption and continuous batching, and the sampling-distribution check."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from scipy.stats import chi2_contingency

MAX_MODEL_LEN = 512


def workload(tokenizer_path: str) -> tuple[list[str], list[Any]]:
    """>= 16 prompts of mixed length with requests ending by max_tokens, by a stop string and by
    reaching max_model_len."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_medusa.data import mtbench_prompts

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    prompts = mtbench_prompts(tok, n=16)
    params = [SamplingParams(temperature=0, max_tokens=48 + 8 * (i % 5)) for i in range(16)]
    for i in (3, 9):
        params[i] = SamplingParams(temperature=0, max_tokens=96, stop=["\n"])
    # Fills the context: ends by max_model_len, with the tree truncated near the end.
    long_prompt = tok.decode(tok("Count: " + ", ".join(str(i) for i in range(400)))["input_ids"]
                             [: MAX_MODEL_LEN - 40])
    prompts.append(long_prompt)
    params.append(SamplingParams(temperature=0, max_tokens=200))
    prompts.append("1, 2, 3, 4, 5, 6, 7, 8,")
    params.append(SamplingParams(temperature=0, max_tokens=64))
    return prompts, params


def generate_tokens(llm: Any, prompts: list[str], params: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def generate_continuous(llm: Any, prompts: list[str], params: list[Any]) -> list[list[int]]:
    """Half the requests first; the rest join while the first half is mid-decode."""
    engine = llm.llm_engine
    half = len(prompts) // 2
    done: dict[str, list[int]] = {}
    for i in range(half):
        engine.add_request(f"c{i}", prompts[i], params[i])
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:
            for i in range(half, len(prompts)):
                engine.add_request(f"c{i}", prompts[i], params[i])
    return [done[f"c{i}"] for i in range(len(prompts))]


def metric(llm: Any, name: str) -> Any:
    for m in llm.get_metrics():
        if m.name == name:
            return getattr(m, "value", getattr(m, "values", None))
    raise KeyError(name)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def sampling_distributions(llm: Any, prompt: str, n: int, length: int, seed0: int,
                           **sampling: Any) -> list[Counter]:
    """Per output position, the tokens drawn by ``n`` seeded requests (temperature 0.8, top-p 0.95
    unless ``sampling`` says otherwise)."""
    from vllm import SamplingParams

    sampling = {"temperature": 0.8, "top_p": 0.95, **sampling}
    params = [SamplingParams(seed=seed0 + i, max_tokens=length, ignore_eos=True, **sampling)
              for i in range(n)]
    # In chunks whose prefills fit one step: vLLM 0.32 on CPU crashes when it rewinds the seeded
    # generator of a request whose prefill was split (`CPU Generator does not use offset`), with or
    # without speculation.
    outs = []
    for i in range(0, n, 32):
        outs += llm.generate([prompt] * len(params[i:i + 32]), params[i:i + 32], use_tqdm=False)
    return [Counter(o.outputs[0].token_ids[p] for o in outs) for p in range(length)]


def same_distribution_pvalue(a: Counter, b: Counter, min_expected: float = 5.0) -> float:
    """Chi-square test of homogeneity; tokens too rare for the test are pooled."""
    tokens = sorted(set(a) | set(b), key=lambda t: -(a[t] + b[t]))
    na, nb = sum(a.values()), sum(b.values())
    rows: list[list[float]] = [[], []]
    other = [0, 0]
    for t in tokens:
        if (a[t] + b[t]) * min(na, nb) / (na + nb) >= min_expected:
            rows[0].append(a[t])
            rows[1].append(b[t])
        else:
            other[0] += a[t]
            other[1] += b[t]
    if sum(other) > 0:
        rows[0].append(other[0])
        rows[1].append(other[1])
    if len(rows[0]) < 2:
        return 1.0
    return float(chi2_contingency(rows)[1])


def greedy_equality_check(device: str) -> None:
    """Standalone version for a CUDA machine: plain vs medusa_tree greedy on the demo model."""
    from vllm import LLM

    from vllm_medusa.demo import demo_heads_path, demo_model_path

    model = str(demo_model_path())
    prompts, params = workload(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plain = LLM(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
    expected = generate_tokens(plain, prompts, params)
    del plain
    medusa = LLM(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0,
                 speculative_config={"method": "medusa_tree", "model": str(demo_heads_path())})
    assert generate_tokens(medusa, prompts, params) == expected, device
