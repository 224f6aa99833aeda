"""Batch generation with medusa_tree on a Ray cluster: Ray Data feeds prompts to vLLM engines.

    python examples/ray_batch.py                          # local Ray, demo model and heads
    python examples/ray_batch.py --address auto --replicas 4 --model M --heads H
    python examples/ray_batch.py --ray-executor           # each engine runs its worker through
                                                          # vLLM's Ray executor as well
    python examples/ray_batch.py -v                       # with vLLM's logs

Each replica is a Ray actor holding one `LLM` with `speculative_config={"method": "medusa_tree"}`;
the plugin registers itself in every process Ray starts (vLLM's `vllm.general_plugins` entry point),
so nothing else has to be installed on the workers than the package itself.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


class MedusaGenerator:
    """A Ray Data callable class: one engine per actor, reused for every batch."""

    def __init__(self, model: str, heads: str, max_tokens: int, ray_executor: bool):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model, max_model_len=2048, enforce_eager=True, seed=0,
                       distributed_executor_backend="ray" if ray_executor else None,
                       speculative_config={"method": "medusa_tree", "model": heads})
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def __call__(self, batch: dict) -> dict:
        outs = self.llm.generate(list(batch["prompt"]), self.params, use_tqdm=False)
        batch["text"] = [o.outputs[0].text for o in outs]
        batch["num_tokens"] = [len(o.outputs[0].token_ids) for o in outs]
        return batch


def run(model: str, heads: str, prompts: list[str], replicas: int, batch_size: int,
        max_tokens: int, ray_executor: bool) -> list[dict]:
    import ray

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    ds = ds.map_batches(MedusaGenerator, fn_constructor_args=(model, heads, max_tokens, ray_executor),
                        batch_size=batch_size, concurrency=replicas, num_cpus=1)
    return ds.take_all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ray-executor", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs")
    args = p.parse_args()

    import ray

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.demo import demo_heads_path, demo_model_path

    # vLLM logs at INFO in every engine process; the actors get the level through Ray's runtime_env.
    env = {} if args.verbose else {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
                                   "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    ray.init(address=args.address, runtime_env={"env_vars": env} if env else None)
    model = args.model or str(demo_model_path())
    heads = args.heads or str(demo_heads_path())
    prompts = mtbench_prompts(model, n=args.num_prompts)
    t0 = time.perf_counter()
    rows = run(model, heads, prompts, args.replicas, args.batch_size, args.max_tokens, args.ray_executor)
    dt = time.perf_counter() - t0
    print(f"{len(rows)} prompts, {sum(r['num_tokens'] for r in rows)} tokens in {dt:.1f} s "
          "(including engine start)")
    print(repr(rows[0]["text"][:200]))


if __name__ == "__main__":
    main()
