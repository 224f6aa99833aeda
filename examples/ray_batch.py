"""Batch generation with medusa_tree on a Ray cluster, through Ray Data's LLM processor.

    python examples/ray_batch.py                           # local Ray, demo model and heads
    python examples/ray_batch.py --replicas 2              # two engine replicas (data parallel)
    python examples/ray_batch.py --address auto --replicas 8 --model M --heads H
    python examples/ray_batch.py --tensor-parallel 2 --ray-executor   # GPU clusters: each engine's
                                                           # ranks as Ray actors (placement group)
    python examples/ray_batch.py -v                        # with vLLM's logs

This is Ray's own ``ray.data.llm`` API (``vLLMEngineProcessorConfig`` + ``build_processor``);
``vllm_medusa.ray_llm`` adds the Medusa speculative config and, on clusters without GPUs, the
resources (Ray's defaults wait forever for a GPU per engine). Every replica's engine finds the
plugin through vLLM's entry point, so the workers need only the package installed.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--model", default=None, help="default: the demo model")
    p.add_argument("--heads", default=None, help="default: the demo model's heads")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (data parallel)")
    p.add_argument("--engine-cpus", type=float, default=1.0,
                   help="CPUs per engine on clusters without GPUs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--ray-executor", action="store_true",
                   help="run each engine's workers as Ray actors (vLLM's Ray executor; GPU only)")
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's and Ray's logs")
    args = p.parse_args()

    import ray

    from vllm_medusa import ray_llm
    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.demo import demo_heads_path, demo_model_path

    quiet = {} if args.verbose else {  # vLLM logs at INFO in every engine process
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    ray.init(address=args.address, runtime_env=ray_llm.driver_runtime_env(**quiet),
             logging_level="INFO" if args.verbose else "WARNING")
    if not args.verbose:
        ray.data.DataContext.get_current().enable_progress_bars = True
    cpu = not ray_llm.cluster_has_gpus()
    if args.ray_executor and cpu:
        raise SystemExit("--ray-executor needs GPUs: vLLM's CPU platform has no Ray executor "
                         "('current platform cpu does not support ray'). On CPU-only clusters, "
                         "scale out with --replicas (one engine per replica).")

    model = args.model or str(demo_model_path())
    heads = args.heads or str(demo_heads_path())
    engine = {"max_model_len": 2048, "enforce_eager": cpu, "tensor_parallel_size": args.tensor_parallel}
    if args.ray_executor:
        engine["distributed_executor_backend"] = "ray"
    config = ray_llm.processor_config(model, heads, engine_kwargs=engine, cpu=cpu,
                                      engine_cpus=args.engine_cpus, concurrency=args.replicas,
                                      batch_size=args.batch_size, chat_template_stage={"enabled": False})
    params = {"temperature": 0.0, "max_tokens": args.max_tokens}
    processor = ray_llm.build_processor(
        config,
        preprocess=lambda row: {"prompt": row["prompt"], "sampling_params": params},
        postprocess=lambda row: {"prompt": row["prompt"], "text": row["generated_text"],
                                 "num_tokens": len(row["generated_tokens"])})
    prompts = mtbench_prompts(model, n=args.num_prompts)
    t0 = time.perf_counter()
    rows = processor(ray.data.from_items([{"prompt": q} for q in prompts])).take_all()
    dt = time.perf_counter() - t0
    tokens = sum(r["num_tokens"] for r in rows)
    print(f"{len(rows)} prompts, {tokens} tokens, {args.replicas} replica(s): {dt:.1f} s including "
          f"engine start, {tokens / dt:.1f} tokens/s")
    print(repr(rows[0]["text"][:200]))


if __name__ == "__main__":
    main()
