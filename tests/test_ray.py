"""medusa_tree through Ray's own LLM APIs on this CPU-only machine: a ``ray.data.llm`` batch job and
a ``ray.serve.llm`` OpenAI app, each answering exactly as plain greedy decoding does.

Ray's defaults ask for a GPU per engine and a whole CPU per light stage; ``vllm_medusa.ray_llm``
sizes both for CPU-only clusters. One local Ray cluster serves the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

MAX_LEN = 1024
MAX_TOKENS = 32
# float32: bf16 greedy on this CPU depends on the batch a request shares (measured on plain vLLM,
# 2026-12-03: the same MT-Bench prompt decoded alone and in a batch of 4 diverges at token 7), and
# Ray batches requests its own way.
ENGINE = {"max_model_len": MAX_LEN, "enforce_eager": True, "dtype": "float32"}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from vllm_medusa.ray_llm import driver_runtime_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env=driver_runtime_env())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts_and_plain(demo_model: Path) -> tuple[list[str], list[str]]:
    """Chat-templated MT-Bench prompts and their plain greedy answers."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from tests.conftest import shutdown_llm
    from vllm_medusa.data import mtbench_prompts

    prompts = mtbench_prompts(AutoTokenizer.from_pretrained(str(demo_model)), n=4)
    llm = LLM(model=str(demo_model), seed=0, **ENGINE)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    return prompts, [o.outputs[0].text for o in outs]


def test_ray_data_llm_processor_on_cpu(ray_cluster, demo_model, demo_heads, prompts_and_plain):
    from vllm_medusa import ray_llm

    prompts, plain = prompts_and_plain
    assert not ray_llm.cluster_has_gpus()
    config = ray_llm.processor_config(demo_model, demo_heads, batch_size=2, concurrency=1,
                                      engine_kwargs=ENGINE,
                                      chat_template_stage={"enabled": False})
    processor = ray_llm.build_processor(
        config,
        preprocess=lambda row: {"prompt": row["prompt"],
                                "sampling_params": {"temperature": 0.0, "max_tokens": MAX_TOKENS}},
        postprocess=lambda row: {"prompt": row["prompt"], "text": row["generated_text"]})
    rows = processor(ray_cluster.data.from_items([{"prompt": p} for p in prompts])).take_all()
    got = {r["prompt"]: r["text"] for r in rows}
    assert [got[p] for p in prompts] == plain


def test_ray_serve_llm_openai_app_on_cpu(ray_cluster, demo_model, demo_heads, prompts_and_plain):
    from openai import OpenAI
    from ray import serve

    from vllm_medusa import ray_llm

    prompts, plain = prompts_and_plain
    config = ray_llm.serve_config(demo_model, demo_heads, model_id="smollm2-medusa",
                                  engine_kwargs=ENGINE)
    serve.run(ray_llm.openai_app([config]), blocking=False)
    try:
        client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["smollm2-medusa"]
        for prompt, expected in zip(prompts[:2], plain[:2]):
            out = client.completions.create(model="smollm2-medusa", prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0)
            assert out.choices[0].text == expected
    finally:
        serve.shutdown()
