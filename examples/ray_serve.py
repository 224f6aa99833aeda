"""An OpenAI-compatible Ray Serve app (``ray.serve.llm``) whose engines decode with Medusa trees.

    python examples/ray_serve.py                        # local Ray, demo model and heads, port 8000
    python examples/ray_serve.py --replicas 2 --model M --heads H --model-id my-model
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-medusa", "prompt": "Hello", "max_tokens": 32}'

Ray Serve routes requests over the replicas; each replica is one vLLM engine with the plugin (found
through vLLM's entry point). On clusters without GPUs, ``vllm_medusa.ray_llm`` gives each engine a
CPU bundle and the Serve actors light CPU shares. Ctrl-C stops the app.
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
    p.add_argument("--model-id", default="smollm2-medusa", help="the name clients ask for")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args()

    import ray
    from ray import serve

    from vllm_medusa import ray_llm
    from vllm_medusa.demo import demo_heads_path, demo_model_path

    ray.init(address=args.address, runtime_env=ray_llm.driver_runtime_env())
    cpu = not ray_llm.cluster_has_gpus()
    engine = {"max_model_len": args.max_model_len, "enforce_eager": cpu,
              "tensor_parallel_size": args.tensor_parallel}
    config = ray_llm.serve_config(args.model or str(demo_model_path()), args.heads or str(demo_heads_path()),
                                  model_id=args.model_id, engine_kwargs=engine, cpu=cpu,
                                  replicas=args.replicas)
    serve.run(ray_llm.openai_app([config], cpu=cpu), blocking=False)
    print(f"serving {args.model_id!r} at http://127.0.0.1:8000/v1 (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
