"""Where the time of a medusa_tree step goes, per phase, at a few batch sizes (CPU).

    python bench/profile_step.py --batch-sizes 1 16 [--tree JSON_OR_PRESET]

Runs with VLLM_MEDUSA_PROFILE=1 (wall-clock timers around each phase of the runner, no device
sync: meaningful on CPU only) and prints milliseconds per engine step for: the whole forward step
(model + attention, including the tree pass), the tree pass of attention alone, preparing tree rows,
verification (the tree walk and its sampler calls), KV compaction, and drafting (heads + trees).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["VLLM_MEDUSA_PROFILE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

PHASES = ["forward", "tree_attention", "tree_rows", "verification", "compaction", "heads_and_tree"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--tree", default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.demo import demo_heads_path, demo_model_path

    model = args.model or str(demo_model_path())
    spec = {"method": "medusa_tree", "model": args.heads or str(demo_heads_path()), "adaptive": False}
    if args.tree:
        spec["tree"] = args.tree
    llm = LLM(model=model, max_model_len=2048, enforce_eager=True, seed=0, speculative_config=spec)
    prompts = mtbench_prompts(model)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)
    print("| batch | wall ms/step | " + " | ".join(PHASES) + " | tokens/step/request |")
    print("|---:|---:|" + "---:|" * len(PHASES) + "---:|")
    for b in args.batch_sizes:
        before = llm.collective_rpc("medusa_stats")[0]
        t0 = time.perf_counter()
        llm.generate(prompts[:b], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        after = llm.collective_rpc("medusa_stats")[0]
        steps = after["steps"] - before["steps"]
        ms = [1000 * (after["seconds"].get(k, 0) - before["seconds"].get(k, 0)) / steps for k in PHASES]
        tree_steps = after["tree_steps"] - before["tree_steps"]
        mal = 1 + (after["accepted_tokens"] - before["accepted_tokens"]) / max(tree_steps, 1)
        print(f"| {b} | {1000 * wall / steps:.1f} | " + " | ".join(f"{m:.1f}" for m in ms) + f" | {mal:.2f} |")


if __name__ == "__main__":
    main()
