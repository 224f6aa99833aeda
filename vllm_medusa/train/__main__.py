"""``python -m vllm_medusa.train``: distill -> features -> train -> evaluate, whole or stage by stage.

    python -m vllm_medusa.train all --model demo --out vllm_medusa/heads/smollm2-135m-instruct
    python -m vllm_medusa.train distill --model /path/to/hf-model --num-samples 2000
    python -m vllm_medusa.train all --model demo --source text --labels model --num-samples 12000 --max-tokens 512
    python -m vllm_medusa.train train --model /path/to/hf-model --out heads/ --heads 4 --epochs 2

Intermediate data (answers, cached hidden states) goes to ``--work-dir`` (default
``<cache>/train/<model name>``), where every stage finds its predecessor's output and resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _resolve_model(name: str) -> Path:
    from .. import demo

    if name == "demo":
        return demo.demo_model_path()
    if name == "tiny":
        return demo.tiny_model_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not a local HF checkpoint (no config.json); use a path, 'demo' or 'tiny'")
    return path.resolve()


def _work_dir(args: argparse.Namespace, model: Path) -> Path:
    if args.work_dir:
        return Path(args.work_dir)
    from ..demo import cache_root

    return cache_root() / "train" / model.name


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="local HF checkpoint, or 'demo' / 'tiny'")
    common.add_argument("--work-dir", help="intermediate data (default <cache>/train/<model name>)")
    common.add_argument("--kv-cache-gb", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE if unset")
    common.add_argument("--source", choices=("generate", "text"), default="generate",
                        help="training answers: the model's own, generated (self-distillation), or "
                             "ShareGPT's text (no generation; pair with --labels model)")
    common.add_argument("--labels", choices=("answer", "model"), default="answer",
                        help="what heads learn: the answers' tokens, or the model's own greedy token "
                             "at each position of them (teacher-forced, from the same forward pass)")
    common.add_argument("--base-model-name", help="base_model_name_or_path written with the heads "
                                                  "(default: the model path; the hub id for 'demo')")

    distill = argparse.ArgumentParser(add_help=False)
    g = distill.add_argument_group("distill")
    g.add_argument("--num-samples", type=int, default=2000, help="ShareGPT prompts to answer")
    g.add_argument("--max-tokens", type=int, default=256, help="answer length limit")
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as served")
    g.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size")

    feat = argparse.ArgumentParser(add_help=False)
    g = feat.add_argument_group("features")
    g.add_argument("--feature-limit", type=int, help="cache features of only the first N answers")
    g.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default=None,
                   help="the backbone's dtype for feature extraction (default: bfloat16, as stored); "
                        "float32 is faster on CPUs without native bf16")

    outp = argparse.ArgumentParser(add_help=False)
    outp.add_argument("--out", help="heads directory (default <work-dir>/heads)")

    train = argparse.ArgumentParser(add_help=False)
    g = train.add_argument_group("train")
    g.add_argument("--heads", type=int, default=5)
    g.add_argument("--layers", type=int, default=1)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=int, default=256, help="positions per step")
    g.add_argument("--heldout", type=float, default=0.02, help="share of answers held out")
    g.add_argument("--own-lm-head", action="store_true", help="train a vocab projection per head")
    g.add_argument("--draft-vocab", type=int, help="with --softmax-vocab data: draft only from the N "
                                                  "most frequent answer tokens (cheaper projection)")
    g.add_argument("--token-conditioned", action="store_true",
                   help="heads also see the embedding of the token just produced (better guesses; "
                        "medusa_tree only, not upstream vLLM's Medusa)")
    g.add_argument("--softmax-vocab", choices=("full", "data"), default="full",
                   help="training softmax over the whole vocabulary, or only the answers' tokens (cheaper)")
    g.add_argument("--max-steps", type=int, help="stop early (debugging)")
    g.add_argument("--seed", type=int, default=0)

    ev = argparse.ArgumentParser(add_help=False)
    g = ev.add_argument_group("evaluate")
    g.add_argument("--eval-max-tokens", type=int, default=256, help="MT-Bench answer length")
    g.add_argument("--tree-budget", type=int, default=None, help="nodes of the default tree")

    p = argparse.ArgumentParser(prog="python -m vllm_medusa.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("all", parents=[common, distill, feat, outp, train, ev], help="every stage, then TRAINING.md")
    sub.add_parser("distill", parents=[common, distill], help="self-distilled ShareGPT answers")
    sub.add_parser("features", parents=[common, feat], help="cache backbone hidden states")
    sub.add_parser("train", parents=[common, outp, train], help="train heads on cached features")
    sub.add_parser("evaluate", parents=[common, outp, ev], help="MT-Bench accuracies and tree")
    conv = sub.add_parser("convert", parents=[common], help="write vLLM's MedusaModel layout")
    conv.add_argument("--heads-dir", required=True)
    conv.add_argument("--out", required=True)
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = _resolve_model(args.model)
    work = _work_dir(args, model)
    work.mkdir(parents=True, exist_ok=True)
    from .distill import engine_env

    engine_env(args.kv_cache_gb)
    from .report import RunLog, write_training_md

    log = RunLog(work)
    data_file = work / ("distill.jsonl" if args.source == "generate" else "sharegpt-text.jsonl")
    features_dir = work / ("features" if (args.source, args.labels) == ("generate", "answer")
                           else f"features-{args.source}-{args.labels}")
    out = Path(getattr(args, "out", None) or work / "heads")
    cmd = args.command
    command = "python -m vllm_medusa.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    if cmd != "convert":
        settings = dict(log.data.get("settings", {}))
        settings.update({k: v for k, v in vars(args).items()
                         if k not in ("command", "model", "work_dir", "out", "kv_cache_gb", "base_model_name")})
        log.update(model=str(model), model_name=model.name, settings=settings)

    base_name = args.base_model_name or (DEMO_HUB_ID if args.model == "demo" else str(model))

    if cmd in ("all", "distill"):
        from .distill import distill, read_records, sharegpt_text, summarize

        before = len(read_records(data_file))
        with log.stage("distill", command) as info:
            if args.source == "text":
                sharegpt_text(model, data_file, num_samples=args.num_samples, max_tokens=args.max_tokens,
                              max_prompt_tokens=args.max_prompt_tokens)
            else:
                distill(model, data_file, num_samples=args.num_samples, max_tokens=args.max_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, temperature=args.temperature,
                        max_num_seqs=args.max_num_seqs, kv_cache_gb=args.kv_cache_gb,
                        seed=getattr(args, "seed", 0))
            records = read_records(data_file)
            info["data"] = summarize(records)
            info["cached"] = len(records) == before
            info["resumed"] = before > 0
        print(f"distill: {info['data']} in {info['seconds']} s")

    if cmd in ("all", "features"):
        from .features import extract_features

        before = len(list(features_dir.glob("shard-*.pt")))
        with log.stage("features", command) as info:
            import torch

            extract_features(model, data_file, features_dir, limit=args.feature_limit, labels=args.labels,
                             compute_dtype=getattr(torch, args.compute_dtype) if args.compute_dtype else None)
            info["cached"] = len(list(features_dir.glob("shard-*.pt"))) == before
            info["resumed"] = before > 0
        print(f"features: {features_dir} in {info['seconds']} s")

    if cmd in ("all", "train"):
        from .trainer import TrainConfig, train_and_save

        cfg = TrainConfig(num_heads=args.heads, num_layers=args.layers, lr=args.lr, epochs=args.epochs,
                          batch_size=args.batch_size, heldout_fraction=args.heldout,
                          shared_lm_head=not args.own_lm_head, softmax_vocab=args.softmax_vocab,
                          token_conditioned=args.token_conditioned, draft_vocab=args.draft_vocab,
                          seed=args.seed)
        with log.stage("train", command) as info:
            result = train_and_save(features_dir, out, cfg, base_model_name_or_path=base_name,
                                    max_steps=args.max_steps)
            info.update(result.summary())
        print(f"train: {result.steps} steps, final loss {result.final_train_loss:.3f}, held-out top-1 "
              + "/".join(f"{row[0]:.3f}" for row in result.summary()["heldout_topk"])
              + f", heads in {out}")

    if cmd in ("all", "evaluate"):
        from .evaluate import DEFAULT_TREE_BUDGET, evaluate, format_result

        with log.stage("evaluate", command):
            result = evaluate(model, out, work, max_tokens=args.eval_max_tokens,
                              tree_budget=args.tree_budget or DEFAULT_TREE_BUDGET, kv_cache_gb=args.kv_cache_gb)
        log.update(evaluation=result)
        print(format_result(result))
        write_training_md(out, log.data)
        print(f"wrote {out}/tree.json, accuracies.json, TRAINING.md")

    if cmd == "convert":
        import torch

        from ..heads import convert_to_vllm_medusa
        from .features import load_backbone

        _, full = load_backbone(model, torch.bfloat16)
        convert_to_vllm_medusa(args.heads_dir, args.out, full.get_output_embeddings().weight.detach())
        print(f"wrote vLLM MedusaModel checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
