"""Measure the step-cost model the adaptive tree policy uses, on the running hardware.

    python bench/calibrate.py --out cost.json [--model M]
    VLLM_MEDUSA_COST_PROFILE=cost.json vllm-medusa serve M --speculative-model medusa:H

Times plain decoding steps carrying T tokens (T requests decoding together, T = 1..64) and writes
them with the flat-then-linear summary (``StepCostModel.fit``). A medusa_tree engine measures forward
passes itself at its first start and saves them (``profile_store.py``); this file overrides that
with whole decoding steps (scheduling and sampling included).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.demo import demo_model_path
    from vllm_medusa.policy import StepCostModel

    model = args.model or str(demo_model_path())
    llm = LLM(model=model, max_model_len=2048, enforce_eager=True, seed=0)
    prompts = mtbench_prompts(model)
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)
    points = {}
    for t in tqdm(args.tokens, desc="tokens per step"):
        batch = [prompts[i % len(prompts)] for i in range(t)]
        llm.generate(batch, SamplingParams(max_tokens=1), use_tqdm=False)  # prefill cached
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        points[t] = (time.perf_counter() - t0) / args.steps
    model_fit = StepCostModel.fit(points).to_dict()
    with open(args.out, "w") as f:
        json.dump({**model_fit, "model": model}, f, indent=2)
    print(json.dumps(model_fit))


if __name__ == "__main__":
    main()
