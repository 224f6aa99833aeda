"""A Medusa-2 output folder served two ways: medusa_tree (its own heads and tree.json, adaptive
off) against plain greedy decoding of the same folder; prints whether every token matches and the
mean acceptance length.

    python bench/medusa2_serve_check.py OUT_DIR --dtype float32 --prompts 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--dtype", default="float32", help="vLLM dtype ('auto' runs a float32 checkpoint in bf16)")
    p.add_argument("--prompts", type=int, default=8, help="MT-Bench first turns")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.train.distill import shutdown_engine

    prompts = mtbench_prompts(AutoTokenizer.from_pretrained(args.folder), n=args.prompts)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    common = {"model": args.folder, "dtype": args.dtype, "max_model_len": 1024, "enforce_eager": True, "seed": 0}
    plain = LLM(**common)
    want = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params, use_tqdm=False)]
    shutdown_engine(plain)
    medusa = LLM(**common, disable_log_stats=False,
                 speculative_config={"method": "medusa_tree", "model": args.folder, "adaptive": False})
    got = [list(o.outputs[0].token_ids) for o in medusa.generate(prompts, params, use_tqdm=False)]
    values = {m.name: getattr(m, "value", None) for m in medusa.get_metrics()}
    accepted, drafts = values["vllm:spec_decode_num_accepted_tokens"], values["vllm:spec_decode_num_drafts"]
    shutdown_engine(medusa)
    differ = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    print(f"identical to plain greedy: {len(prompts) - len(differ)}/{len(prompts)} (differ: {differ}); "
          f"mean acceptance length {1 + accepted / max(drafts, 1):.3f} ({accepted} accepted, {drafts} drafts)")


if __name__ == "__main__":
    main()
