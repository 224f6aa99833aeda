"""Self-distillation throughput: answer tokens per second of plain vLLM generating greedy answers to
ShareGPT prompts, per engine dtype and batch size (`max_num_seqs`); what `train distill` costs.

    .venv/bin/python bench/distill_throughput.py --configs bfloat16:64,float32:64,float32:128 --prompts 128

Each configuration is a fresh engine in its own child process, one at a time, timed from the first
prompt to the last answer after one warm-up request. The prompts are ShareGPT first turns past the
first 2000 (those the shipped demo heads were trained on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import default_model, md_table, results_dir, setup_env, write_json  # noqa: E402

RESULT = "@@distill-result "


def worker(model: str, dtype: str, max_num_seqs: int, prompts: int, max_tokens: int, skip: int) -> None:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_medusa.train.distill import build_llm, sharegpt_prompts, shutdown_engine

    chosen = sharegpt_prompts(AutoTokenizer.from_pretrained(model), skip + prompts, 512)[skip:]
    llm = build_llm(model, max_model_len=512 + max_tokens, max_num_seqs=max_num_seqs, dtype=dtype)
    llm.generate([{"prompt_token_ids": chosen[0].token_ids}], SamplingParams(max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p.token_ids} for p in chosen],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(RESULT + json.dumps({"dtype": dtype, "max_num_seqs": max_num_seqs, "prompts": len(chosen),
                               "answer_tokens": tokens, "seconds": round(seconds, 1),
                               "tokens_per_s": round(tokens / seconds, 1)}), flush=True)
    shutdown_engine(llm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model folder (default: the demo model)")
    p.add_argument("--configs", default="bfloat16:64,float32:64,float32:128", help="DTYPE:MAX_NUM_SEQS,...")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--skip", type=int, default=2000, help="ShareGPT prompts to skip first")
    p.add_argument("--name", help="results folder name under bench/results/ (default: a timestamp)")
    p.add_argument("--out", help="results folder (overrides --name)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    setup_env()
    model = args.model or default_model()
    if args.worker:
        dtype, seqs = args.worker.split(":")
        worker(model, dtype, int(seqs), args.prompts, args.max_tokens, args.skip)
        return
    from tqdm import tqdm

    out = results_dir(args.out, args.name)
    rows = []
    for config in tqdm(args.configs.split(","), desc="distill throughput", unit="engine"):
        proc = subprocess.run([sys.executable, __file__, "--worker", config, "--model", model,
                               "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                               "--skip", str(args.skip)], capture_output=True, text=True)
        found = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode or not found:
            raise SystemExit(f"{config} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        rows.append(found[0])
    base = rows[0]["tokens_per_s"]
    write_json(out / "distill_throughput.json", {"model": model, "max_tokens": args.max_tokens, "rows": rows})
    table = md_table(["dtype", "max_num_seqs", "answer tokens", "seconds", "tokens/s", f"x {args.configs.split(',')[0]}"],
                     [[r["dtype"], r["max_num_seqs"], r["answer_tokens"], r["seconds"], r["tokens_per_s"],
                       f"{r['tokens_per_s'] / base:.2f}"] for r in rows])
    (out / "distill_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
