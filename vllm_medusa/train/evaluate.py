"""Held-out head accuracy on MT-Bench and the tree it implies.

The base model answers the MT-Bench questions greedily (the setting the speed-ups are reported in),
the backbone's hidden states are cached as for training, and each head's top-10 ranks of the true
next tokens give ``accuracies[k][i]``. From those, ``trees.optimal_tree`` builds the default tree,
written next to the heads as ``tree.json`` with ``accuracies.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..heads import load_medusa_heads
from ..trees import expected_acceptance_length, optimal_tree
from .distill import build_llm, generate_answers, mtbench_prompts, read_records, shutdown_engine
from .features import IGNORE, extract_features, load_features
from .metrics import LookupReplay, cumulative, head_ranks, rank_accuracies, simulated_acceptance

DEFAULT_TREE_BUDGET = 16
REPORT_BUDGETS = (4, 8, 16, 32, 64)
TOPK = 10


def generate_mtbench_answers(model: str | os.PathLike, out_file: str | os.PathLike, *,
                             max_tokens: int = 256, turns: Sequence[int] = (0, 1),
                             kv_cache_gb: int = 4, max_num_seqs: int = 64, dtype: str = "auto") -> Path:
    """Greedy answers of the base model to MT-Bench questions (both turns as single prompts)."""
    from transformers import AutoTokenizer

    prompts = mtbench_prompts(AutoTokenizer.from_pretrained(str(model)), turns)
    done = {r["id"] for r in read_records(out_file)}
    if all(p.id in done for p in prompts):
        return Path(out_file)
    max_prompt = max(len(p.token_ids) for p in prompts)
    llm = build_llm(model, max_model_len=max_prompt + max_tokens, max_num_seqs=max_num_seqs,
                    kv_cache_gb=kv_cache_gb, dtype=dtype)
    try:
        return generate_answers(llm, prompts, out_file, max_tokens=max_tokens, temperature=0.0,
                                desc="mt-bench answers")
    finally:
        shutdown_engine(llm)


def evaluate_heads(model: str | os.PathLike, heads_dir: str | os.PathLike, features_dir: str | os.PathLike,
                   *, tree_budget: int = DEFAULT_TREE_BUDGET, budgets: Sequence[int] = REPORT_BUDGETS,
                   write: bool = True, answers_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Accuracies, default tree and predicted acceptance of the heads on cached held-out features;
    with the answers' records (their prompts), also per step with the prompt-lookup branch."""
    feats = load_features(features_dir)
    heads, all_ranks = _heads_and_ranks(feats, heads_dir, torch.bfloat16)
    targets = feats.targets(heads.num_heads)
    rows = (targets[:, 0] != IGNORE).nonzero().squeeze(1)
    ranks = all_ranks[rows]
    acc = rank_accuracies(ranks, TOPK)

    lookup = _lookup_replay(feats, answers_file) if answers_file is not None else None

    def stepped(t: Sequence[Sequence[int]], with_lookup: bool = False) -> float:
        return simulated_acceptance(all_ranks, t, feats.lengths, lookup if with_lookup else None)

    tree = optimal_tree(acc, tree_budget)
    per_budget = {}
    for b in budgets:
        t = optimal_tree(acc, b)
        per_budget[b] = {"nodes": len(t), "predicted": expected_acceptance_length(t, acc),
                         "simulated": simulated_acceptance(ranks, t),
                         "per_step": stepped(t)}
        if lookup is not None:
            per_budget[b]["per_step_lookup"] = stepped(t, True)
    chain = [tuple([0] * d) for d in range(1, heads.num_heads + 1)]
    result = {
        "model": str(model), "heads": str(heads_dir), "positions": int(len(rows)),
        "answers": int(len(feats.lengths)), "accuracies": acc, "topk": cumulative(acc),
        "tree_budget": tree_budget, "tree": [list(p) for p in tree],
        "tree_predicted": expected_acceptance_length(tree, acc),
        "tree_simulated": simulated_acceptance(ranks, tree),
        "tree_per_step": stepped(tree),
        "chain_predicted": expected_acceptance_length(chain, acc),
        "chain_simulated": simulated_acceptance(ranks, chain),
        "chain_per_step": stepped(chain),
        "budgets": per_budget,
    }
    if lookup is not None:
        result["lookup_alone_per_step"] = stepped([], True)
    if write:
        out = Path(heads_dir)
        (out / "tree.json").write_text(json.dumps(result["tree"]) + "\n")
        (out / "accuracies.json").write_text(json.dumps([[round(a, 6) for a in row] for row in acc]) + "\n")
    return result


def _heads_and_ranks(feats: Any, heads_dir: str | os.PathLike, dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
    """The heads loaded for these features, and each head's rank of the true token at every row."""
    vocab, hidden = feats.lm_head.shape
    heads = load_medusa_heads(heads_dir, hidden_size=hidden, vocab_size=vocab, dtype=dtype)
    ranks = head_ranks(heads, feats.hidden, feats.targets(heads.num_heads),
                       feats.lm_head if heads.shared_lm_head else None, topk=TOPK, compute_dtype=dtype,
                       token_embeds=(feats.token_embeds(torch.arange(len(feats.tokens)),
                                                        heads.num_heads if heads.path_conditioned else None)
                                     if heads.token_conditioned else None))
    return heads, ranks


def _lookup_replay(feats: Any, answers_file: str | os.PathLike, **kwargs: int) -> LookupReplay:
    """The prompt-lookup branch over the answers of ``feats``, with their prompts from ``answers_file``."""
    prompts = {r["id"]: r["prompt_token_ids"] for r in read_records(answers_file)}
    return LookupReplay([prompts[i] for i in feats.ids], feats.tokens.tolist(), **kwargs)


def replay_answers(model: str | os.PathLike, heads_dir: str | os.PathLike, answers_file: str | os.PathLike,
                   work_dir: str | os.PathLike, tree: Sequence[Sequence[int]], *, lookup: int = 0,
                   lookup_min: int = 2, lookup_max: int = 4,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Mean acceptance per step that ``tree`` (and the prompt-lookup branch of ``lookup`` tokens,
    offered whole) would give on recorded answers (``answers_file``: records of ``prompt_token_ids``
    and ``output_token_ids``), replayed from the backbone's hidden states: what an engine decoding
    the same prompts with that fixed tree must report as its mean acceptance length."""
    feats = load_features(extract_features(model, answers_file, Path(work_dir) / "replay-features",
                                           dtype=dtype, desc="replay features"))
    _, ranks = _heads_and_ranks(feats, heads_dir, dtype)
    replay = _lookup_replay(feats, answers_file, min_n=lookup_min, max_n=lookup_max, k=lookup) if lookup else None
    paths = [list(p) for p in tree]
    return {
        "tree": simulated_acceptance(ranks, paths, feats.lengths),
        "tree_and_lookup": simulated_acceptance(ranks, paths, feats.lengths, replay) if replay else None,
        "lookup_alone": simulated_acceptance(ranks, [], feats.lengths, replay) if replay else None,
        "answers": len(feats.lengths), "answer_tokens": int(len(feats.tokens)),
        "top1": [row[0] for row in rank_accuracies(ranks, TOPK)],
    }


def format_result(result: dict[str, Any], show_topk: int = 5) -> str:
    """Human-readable accuracy and acceptance tables."""
    lines = [f"held-out positions: {result['positions']} ({result['answers']} answers)",
             "head  " + "  ".join(f"top{i + 1:<2}" for i in range(show_topk))]
    for k, row in enumerate(result["topk"]):
        lines.append(f"{k:>4}  " + "  ".join(f"{a:.3f}" for a in row[:show_topk]))
    lines.append("budget  nodes  predicted  per position  per step  +lookup   (mean accepted tokens, "
                 "incl. the base token)")
    for b, r in result["budgets"].items():
        lines.append(f"{b:>6}  {r['nodes']:>5}  {r['predicted']:>9.3f}  {r['simulated']:>12.3f}  "
                     f"{r.get('per_step', float('nan')):>8.3f}  {r.get('per_step_lookup', float('nan')):>7.3f}")
    if "lookup_alone_per_step" in result:
        lines.append(f"prompt-lookup branch alone: per step {result['lookup_alone_per_step']:.3f}")
    lines.append(f"chain of {len(result['topk'])} (upstream vLLM Medusa): predicted "
                 f"{result['chain_predicted']:.3f}, per position {result['chain_simulated']:.3f}, "
                 f"per step {result.get('chain_per_step', float('nan')):.3f}")
    lines.append(f"default tree ({len(result['tree'])} nodes): predicted {result['tree_predicted']:.3f}, "
                 f"per position {result['tree_simulated']:.3f}, per step {result.get('tree_per_step', float('nan')):.3f}")
    return "\n".join(lines)


def evaluate(model: str | os.PathLike, heads_dir: str | os.PathLike, work_dir: str | os.PathLike, *,
             max_tokens: int = 256, tree_budget: int = DEFAULT_TREE_BUDGET, kv_cache_gb: int = 4,
             dtype: str = "auto") -> dict[str, Any]:
    """MT-Bench answers -> features -> accuracies, tree.json, accuracies.json (all cached in work_dir)."""
    data, feats = mtbench_eval_data(model, work_dir, max_tokens=max_tokens, kv_cache_gb=kv_cache_gb, dtype=dtype)
    return evaluate_heads(model, heads_dir, feats, tree_budget=tree_budget, answers_file=data)


def mtbench_eval_data(model: str | os.PathLike, work_dir: str | os.PathLike, *, max_tokens: int = 256,
                      kv_cache_gb: int = 4, dtype: str = "auto") -> tuple[Path, Path]:
    """The held-out set every evaluation uses, cached in ``work_dir``: the base model's greedy
    MT-Bench answers and their features directory."""
    work = Path(work_dir)
    data = generate_mtbench_answers(model, work / "mtbench-answers.jsonl", max_tokens=max_tokens,
                                    kv_cache_gb=kv_cache_gb, dtype=dtype)
    return data, extract_features(model, data, work / "mtbench-features", desc="mt-bench features")
