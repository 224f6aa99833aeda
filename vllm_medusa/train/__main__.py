"""``python -m vllm_medusa.train``: distill -> features -> train -> evaluate, whole or stage by stage.

    python -m vllm_medusa.train all --model demo --out vllm_medusa/heads/smollm2-135m-instruct
    python -m vllm_medusa.train distill --model /path/to/hf-model --num-samples 2000
    python -m vllm_medusa.train all --model demo --source text --labels model --num-samples 12000 --max-tokens 512
    python -m vllm_medusa.train train --model /path/to/hf-model --out heads/ --heads 4 --epochs 2
    python -m vllm_medusa.train all --model demo --out m2/ --recipe medusa-2 --num-samples 300
    python -m vllm_medusa.train compare --model demo --tuned m2/ --baseline-heads vllm_medusa/heads/smollm2-135m-instruct

Intermediate data (answers, cached hidden states) goes to ``--work-dir`` (default
``<cache>/train/<model name>``), where every stage finds its predecessor's output and resumes.
"""

from __future__ import annotations

import argparse
import json
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
    common.add_argument("--archive", help="directory of gzipped record shards to keep in git: restored into "
                        "the work dir before any stage, and distill adds each finished chunk of 512 answers")
    common.add_argument("--base-model-name", help="base_model_name_or_path written with the heads "
                                                  "(default: the model path; the hub id for 'demo')")

    distill = argparse.ArgumentParser(add_help=False)
    g = distill.add_argument_group("distill")
    g.add_argument("--num-samples", type=int, default=2000, help="ShareGPT prompts to answer")
    g.add_argument("--max-tokens", type=int, default=256, help="answer length limit")
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as served")
    g.add_argument("--max-num-seqs", type=int, default=128, help="engine batch size")
    g.add_argument("--distill-dtype", default=None,
                   help="the engine's dtype for generating answers (default: the model's own on GPUs and "
                        "on CPUs with native bf16 (AMX), float32 on other CPUs, ~3x faster there)")

    feat = argparse.ArgumentParser(add_help=False)
    g = feat.add_argument_group("features")
    g.add_argument("--feature-limit", type=int, help="cache features of only the first N answers")
    g.add_argument("--feature-start", type=int, default=0,
                   help="skip the first N answers (a multiple of 128): features of only the answers "
                        "added since the heads given to --init-heads were trained")
    g.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default=None,
                   help="the backbone's dtype for feature extraction (default: bfloat16, as stored, or "
                        "float32 on CPUs without native bf16, where it is faster)")

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
    g.add_argument("--softmax-size", type=int, help="with --softmax-vocab data: train the softmax over "
                   "only the N most frequent answer tokens; rarer targets are left out of the loss (cheaper "
                   "on large data; at least --draft-vocab)")
    g.add_argument("--token-conditioned", action="store_true",
                   help="heads also see the embedding of the token just produced (better guesses; "
                        "medusa_tree only, not upstream vLLM's Medusa)")
    g.add_argument("--path-conditioned", action="store_true",
                   help="token-conditioned heads (implies --token-conditioned) where head k sees the token "
                        "just before its target (the drafted path's), not the one just produced; trees are "
                        "drafted depth by depth")
    g.add_argument("--softmax-vocab", choices=("full", "data"), default="full",
                   help="training softmax over the whole vocabulary, or only the answers' tokens (cheaper)")
    g.add_argument("--soft-targets", action="store_true",
                   help="learn the base model's distribution of each target token (KL), not only its token")
    g.add_argument("--init-heads", help="continue training these heads (same architecture) instead of "
                   "starting from identity blocks, e.g. on answers added since they were trained")
    g.add_argument("--max-steps", type=int, help="stop early (debugging)")
    g.add_argument("--seed", type=int, default=0)

    ev = argparse.ArgumentParser(add_help=False)
    g = ev.add_argument_group("evaluate")
    g.add_argument("--eval-max-tokens", type=int, default=256, help="MT-Bench answer length")
    g.add_argument("--tree-budget", type=int, default=None, help="nodes of the default tree")

    m2 = argparse.ArgumentParser(add_help=False)
    g = m2.add_argument_group("medusa-2 (joint phase, after the Medusa-1 warm-up of the heads)")
    g.add_argument("--recipe", choices=("medusa-1", "medusa-2"), default="medusa-1",
                   help="medusa-1: heads on the frozen backbone; medusa-2: then heads and backbone "
                        "(LoRA, merged at the end) together, --out receiving the model and its heads")
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lr-backbone", type=float, default=1e-4, help="LoRA learning rate")
    g.add_argument("--lr-heads", type=float, default=1e-3, help="heads' learning rate in the joint phase")
    g.add_argument("--heads-weight", type=float, default=0.2, help="lambda: heads loss weight beside the KL")
    g.add_argument("--joint-epochs", type=float, default=1.0)
    g.add_argument("--joint-batch-tokens", type=int, default=2048, help="prompt + answer tokens per step")
    g.add_argument("--joint-limit", type=int, help="train the joint phase on the first N answers only")
    g.add_argument("--joint-max-steps", type=int, help="stop the joint phase early")
    g.add_argument("--checkpoint-every", type=int, default=50, help="joint-phase steps between checkpoints")
    g.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the merged model (bf16 rounding can undo small LoRA updates)")

    p = argparse.ArgumentParser(prog="python -m vllm_medusa.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("all", parents=[common, distill, feat, outp, train, ev, m2],
                   help="every stage, then TRAINING.md (medusa-1) or medusa2.json (medusa-2)")
    sub.add_parser("distill", parents=[common, distill], help="self-distilled ShareGPT answers")
    sub.add_parser("features", parents=[common, feat], help="cache backbone hidden states")
    sub.add_parser("train", parents=[common, outp, train], help="train heads on cached features")
    sub.add_parser("evaluate", parents=[common, outp, ev], help="MT-Bench accuracies and tree")
    cmp = sub.add_parser("compare", parents=[common],
                         help="a Medusa-2 model against its original on MT-Bench: KL, agreement, acceptance")
    cmp.add_argument("--tuned", required=True, help="the Medusa-2 output folder (model and heads)")
    cmp.add_argument("--baseline-heads", action="append", default=[],
                     help="Medusa-1 heads of the original model, for acceptance (repeatable)")
    cmp.add_argument("--tree", help="tree.json to replay all heads on (default: the first baseline's tree.json)")
    cmp.add_argument("--eval-max-tokens", type=int, default=256, help="MT-Bench answer length")
    cmp.add_argument("--json", help="also write the numbers to this file")
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
    recipe = getattr(args, "recipe", "medusa-1")
    out = Path(getattr(args, "out", None) or work / ("heads" if recipe == "medusa-1" else "medusa2-model"))
    warmup_heads = work / "medusa2" / "warmup-heads"
    cmd = args.command
    command = "python -m vllm_medusa.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    if cmd not in ("convert", "compare"):
        settings = dict(log.data.get("settings", {}))
        settings.update({k: v for k, v in vars(args).items()
                         if k not in ("command", "model", "work_dir", "out", "kv_cache_gb", "base_model_name")})
        log.update(model=str(model), model_name=model.name, settings=settings)

    base_name = args.base_model_name or (DEMO_HUB_ID if args.model == "demo" else str(model))

    if args.archive and cmd not in ("convert", "compare"):
        from .distill import restore_records

        restored = restore_records(args.archive, data_file)
        if restored:
            print(f"restored {restored} records from {args.archive} into {data_file}")

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
                        seed=getattr(args, "seed", 0), dtype=args.distill_dtype, archive_dir=args.archive)
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

            extract_features(model, data_file, features_dir, limit=args.feature_limit,
                             start=args.feature_start, labels=args.labels,
                             compute_dtype=getattr(torch, args.compute_dtype) if args.compute_dtype else None)
            info["cached"] = len(list(features_dir.glob("shard-*.pt"))) == before
            info["resumed"] = before > 0
        print(f"features: {features_dir} in {info['seconds']} s")

    if cmd == "all" and recipe == "medusa-2" and (warmup_heads / "config.json").is_file():
        print(f"train: reusing the Medusa-1 warm-up heads in {warmup_heads} (delete them to retrain)")
    elif cmd in ("all", "train"):
        from .trainer import TrainConfig, train_and_save

        cfg = TrainConfig(num_heads=args.heads, num_layers=args.layers, lr=args.lr, epochs=args.epochs,
                          batch_size=args.batch_size, heldout_fraction=args.heldout,
                          shared_lm_head=not args.own_lm_head, softmax_vocab=args.softmax_vocab,
                          token_conditioned=args.token_conditioned or args.path_conditioned,
                          path_conditioned=args.path_conditioned, draft_vocab=args.draft_vocab,
                          softmax_size=args.softmax_size,
                          soft_targets=args.soft_targets, seed=args.seed)
        heads_out = out if recipe == "medusa-1" else warmup_heads
        with log.stage("train", command) as info:
            result = train_and_save(features_dir, heads_out, cfg, base_model_name_or_path=base_name,
                                    max_steps=args.max_steps, init_heads=args.init_heads)
            info.update(result.summary())
        print(f"train: {result.steps} steps, final loss {result.final_train_loss:.3f}, held-out top-1 "
              + "/".join(f"{row[0]:.3f}" for row in result.summary()["heldout_topk"])
              + f", heads in {heads_out}")

    if cmd == "all" and recipe == "medusa-2":
        from .compare import tuned_work_dir
        from .evaluate import DEFAULT_TREE_BUDGET, evaluate, format_result
        from .medusa2 import Medusa2Config, run_medusa2

        cfg2 = Medusa2Config(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lr_heads=args.lr_heads,
                             lr_backbone=args.lr_backbone, heads_weight=args.heads_weight,
                             epochs=args.joint_epochs, batch_tokens=args.joint_batch_tokens,
                             checkpoint_every=args.checkpoint_every, seed=args.seed, save_dtype=args.save_dtype)
        with log.stage("joint", command) as info:
            result2 = run_medusa2(model, data_file, warmup_heads, out, work / "medusa2", cfg2,
                                  base_model_name_or_path=base_name, max_steps=args.joint_max_steps,
                                  limit=args.joint_limit)
            info.update(result2.summary())
        print(f"joint: {result2.steps} steps on {result2.records} answers, final KL {result2.final_kl:.4f}, "
              f"heads loss {result2.final_heads_loss:.3f}, head-0 top-1 {result2.final_head0_top1:.3f}; "
              f"model and heads in {out}")
        with log.stage("evaluate-medusa2", command):
            result = evaluate(out, out, tuned_work_dir(work, out), max_tokens=args.eval_max_tokens,
                              tree_budget=args.tree_budget or DEFAULT_TREE_BUDGET, kv_cache_gb=args.kv_cache_gb,
                              dtype=args.save_dtype)
        print(format_result(result))
        summary = json.loads((out / "medusa2.json").read_text())
        summary["evaluation"] = {k: result[k] for k in ("positions", "answers", "topk", "tree",
                                                        "tree_per_step", "chain_per_step")}
        (out / "medusa2.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}/tree.json, accuracies.json, medusa2.json")
        return 0

    if cmd in ("all", "evaluate"):
        from .evaluate import DEFAULT_TREE_BUDGET, evaluate, format_result

        with log.stage("evaluate", command):
            result = evaluate(model, out, work, max_tokens=args.eval_max_tokens,
                              tree_budget=args.tree_budget or DEFAULT_TREE_BUDGET, kv_cache_gb=args.kv_cache_gb)
        log.update(evaluation=result)
        print(format_result(result))
        write_training_md(out, log.data)
        print(f"wrote {out}/tree.json, accuracies.json, TRAINING.md")

    if cmd == "compare":
        from .compare import compare, format_comparison, load_tree

        tuned = Path(args.tuned)
        if not (tuned / "config.json").is_file() or not (tuned / "medusa_lm_head.safetensors").is_file():
            raise SystemExit(f"--tuned {tuned}: not a Medusa-2 output folder (needs config.json and "
                             "medusa_lm_head.safetensors)")
        trees = None
        if args.baseline_heads:
            tree_file = Path(args.tree or Path(args.baseline_heads[0]) / "tree.json")
            if not tree_file.is_file():
                raise SystemExit(f"no tree to replay: {tree_file} does not exist (pass --tree)")
            tree = load_tree(tree_file)
            trees = {f"{tree_file.name} ({len(tree)} nodes)": tree}
            if len(tree) > 4:
                trees[f"first 4 nodes of {tree_file.name}"] = tree[:4]
        result = compare(model, tuned, work, baseline_heads=args.baseline_heads, trees=trees,
                         max_tokens=args.eval_max_tokens, kv_cache_gb=args.kv_cache_gb)
        print(format_comparison(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0

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
