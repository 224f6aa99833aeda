"""Engine-measured vs replayed acceptance on the same answers.

The medusa_tree engine decodes MT-Bench prompts greedily with a fixed tree (no adaptive policy),
optionally with the prompt-lookup branch, and reports its mean acceptance length. The offline
replay (``train.metrics.simulated_acceptance``) then walks the same tree over the engine's own
answers, step by step, from the backbone's hidden states. Both count tokens per tree step, the
base model's own token included; they should agree, and where they do not, the difference is in
what the engine offers or verifies, not in the heads.

    python bench/replay_gap.py --num-prompts 24 --max-tokens 128 --nodes 4 --lookup 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model folder (default: the demo model)")
    p.add_argument("--heads", default=None, help="heads folder (default: the demo heads)")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--nodes", type=int, default=4, help="the heads' tree cut to this many nodes")
    p.add_argument("--lookup", type=int, default=0, help="prompt-lookup branch tokens (0: off)")
    p.add_argument("--batch", type=int, default=8, help="max_num_seqs of the engine")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--free-nodes", action="store_true",
                   help="a flat step-cost profile: extra verified tokens cost nothing (as on a GPU "
                        "at small batch), so the lookup branch is offered whole")
    p.add_argument("--out", default=None, help="folder for answers, features and result.json")
    args = p.parse_args()

    from vllm_medusa.demo import demo_heads_path, demo_model_path

    model = args.model or str(demo_model_path())
    heads = args.heads or str(demo_heads_path())
    out = Path(args.out or tempfile.mkdtemp(prefix="replay-gap-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.free_nodes:
        flat = out / "flat-cost.json"
        flat.write_text(json.dumps({"base": 0.05, "knee": 4096, "per_token": 0.0, "draft": 0.0,
                                    "per_node": 0.0, "tree_pass": 0.0, "tree_per_request": 0.0}))
        os.environ["VLLM_MEDUSA_COST_PROFILE"] = str(flat)
    os.environ.setdefault("VLLM_MEDUSA_CACHE_DIR", "off")

    result = measure(model, heads, out, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                     nodes=args.nodes, lookup=args.lookup, batch=args.batch, dtype=args.dtype)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "tree"}, indent=2))


def measure(model: str, heads: str, out: Path, *, num_prompts: int, max_tokens: int, nodes: int,
            lookup: int, batch: int, dtype: str) -> dict:
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_medusa.data import mtbench_prompts
    from vllm_medusa.proposer import heads_default_tree
    from vllm_medusa.train.evaluate import replay_answers
    from vllm_medusa.trees import MedusaTree

    tok = AutoTokenizer.from_pretrained(model)
    prompts = mtbench_prompts(tok, num_prompts)
    tree = MedusaTree(heads_default_tree(heads)).truncate(nodes)
    spec = {"method": "medusa_tree", "model": heads, "tree": [list(t) for t in tree.paths],
            "adaptive": False, "lookup": lookup}
    llm = LLM(model=model, dtype=dtype, max_model_len=2048, enforce_eager=True, seed=0,
              max_num_seqs=batch, speculative_config=spec)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    wall = time.perf_counter() - t0
    stats = llm.collective_rpc("medusa_stats")[0]
    del llm

    records = out / "answers.jsonl"
    with records.open("w") as fh:
        for i, o in enumerate(outs):
            fh.write(json.dumps({"id": f"mt-{i}", "prompt_token_ids": list(o.prompt_token_ids),
                                 "output_token_ids": list(o.outputs[0].token_ids)}) + "\n")
    paths = [list(t) for t in tree.paths]
    replay = replay_answers(model, heads, records, out, paths, lookup=lookup, dtype=getattr(torch, dtype))
    return {
        "model": model, "heads": heads, "prompts": num_prompts, "max_tokens": max_tokens,
        "nodes": nodes, "lookup": lookup, "batch": batch, "dtype": dtype, "tree": paths,
        "answer_tokens": replay["answer_tokens"], "engine_seconds": round(wall, 1),
        "engine": stats["mean_acceptance_length"],
        "engine_tree_steps": stats["tree_steps"],
        "engine_lookup_accepted": stats["lookup_accepted"],
        "engine_per_depth": stats["accepted_per_depth"],
        "replay_tree": replay["tree"],
        "replay_tree_and_lookup": replay["tree_and_lookup"],
        "replay_lookup_alone": replay["lookup_alone"],
    }


if __name__ == "__main__":
    main()
