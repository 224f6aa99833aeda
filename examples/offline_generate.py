"""Offline batch generation with vLLM on MT-Bench first-turn prompts; prints tokens/s.

    python examples/offline_generate.py --batch-size 16 --max-tokens 128
    python examples/offline_generate.py --speculative-config '{"method": "ngram", ...}'

Greedy decoding, one `LLM.generate` call over `--batch-size` prompts after a short warm-up;
tokens/s counts generated tokens over the wall time of that call.
"""

from __future__ import annotations

import argparse
import json
import os
import time

# Set before vLLM is imported: no model hub here, and the CPU backend needs an explicit KV size.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


from vllm_medusa.quiet import early_vllm_log_level, quiet_logs  # noqa: E402 (after the env)

early_vllm_log_level()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model path or name (default: the demo model)")
    p.add_argument("--batch-size", type=int, default=1, help="number of prompts (default 1)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--speculative-config",
        type=json.loads,
        default=None,
        help="JSON passed to LLM(speculative_config=...)",
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip torch.compile (default on: same speed here, engine starts much faster)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--show", type=int, default=1, help="print this many outputs (default 1)")
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    quiet_logs(args.verbose)
    from vllm import LLM, SamplingParams

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.demo import demo_model_path

    model = args.model or str(demo_model_path())
    questions = mtbench_prompts(model)
    prompts = [questions[i % len(questions)] for i in range(args.batch_size)]

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        speculative_config=args.speculative_config,
        seed=0,
        use_tqdm_on_load=args.verbose,
    )
    start_s = time.perf_counter() - t0

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    # Warm up on an unrelated prompt: reusing a benchmark prompt would pre-fill the prefix cache.
    llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0

    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for o in outputs[: args.show]:
        print(f"--- prompt: {o.prompt[-120:]!r}\n--- output: {o.outputs[0].text!r}")
    print(
        f"model={model} batch={len(prompts)} max_tokens={args.max_tokens} "
        f"eager={args.enforce_eager} spec={json.dumps(args.speculative_config)}"
    )
    print(f"engine start {start_s:.1f} s; generated {n_tokens} tokens in {gen_s:.2f} s")
    print(f"tokens/s: {n_tokens / gen_s:.1f}")


if __name__ == "__main__":
    main()
