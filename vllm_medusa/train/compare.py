"""How far a tuned (Medusa-2) model moved from its original, and what its heads gain.

Quality is measured on held-out MT-Bench prompts, both ways a user would notice a change:
teacher-forced along the original's greedy answers (per-token ``KL(original || tuned)`` and the
share of positions where both models' argmax agree), and free-running (each model's own greedy
answer: identical answers, and how much of the original's answer the tuned one reproduces before
it first differs). Speed is the offline replay of each model's own greedy answers with its own
heads on the same tree (``evaluate.replay_answers``), which is what an engine reports as its mean
acceptance length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .distill import read_records
from .features import _batches, load_backbone


@torch.inference_mode()
def teacher_forced_quality(original: str | os.PathLike, tuned: str | os.PathLike,
                           records: Sequence[dict[str, Any]], max_batch_tokens: int = 4096) -> dict[str, float]:
    """Per answer token: mean ``KL(original || tuned)`` (nats) and argmax agreement, along ``records``."""
    _, orig = load_backbone(original, torch.float32)
    _, new = load_backbone(tuned, torch.float32)
    kl_sum, agree, n = 0.0, 0, 0
    for batch in _batches(records, max_batch_tokens):
        seqs = [records[i]["prompt_token_ids"] + records[i]["output_token_ids"] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        a = orig(input_ids=ids, attention_mask=mask).logits
        b = new(input_ids=ids, attention_mask=mask).logits
        for r, i in enumerate(batch):
            p, m = len(records[i]["prompt_token_ids"]), len(records[i]["output_token_ids"])
            la = F.log_softmax(a[r, p - 1:p - 1 + m].float(), -1)
            lb = F.log_softmax(b[r, p - 1:p - 1 + m].float(), -1)
            kl_sum += float((la.exp() * (la - lb)).sum())
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            n += m
    return {"kl_per_token": kl_sum / max(n, 1), "argmax_agreement": agree / max(n, 1), "tokens": n}


def greedy_agreement(original: Sequence[dict[str, Any]], tuned: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Over prompts answered by both: identical answers, the share of the original's answer tokens
    reproduced before the first difference, and position-wise identical tokens."""
    by_id = {r["id"]: r["output_token_ids"] for r in tuned}
    pairs = [(r["output_token_ids"], by_id[r["id"]]) for r in original if r["id"] in by_id]
    if not pairs:
        raise ValueError("the two answer sets share no prompt ids")
    same = prefix = positions = total = 0
    for a, b in pairs:
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix += d
        positions += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return {"answers": len(pairs), "identical_answers": same / len(pairs),
            "prefix_share": prefix / max(total, 1), "positionwise_share": positions / max(total, 1)}


def side_by_side(tokenizer: Any, original: Sequence[dict[str, Any]], tuned: Sequence[dict[str, Any]],
                 n: int = 3, chars: int = 300) -> list[dict[str, str]]:
    """The first ``n`` prompts whose answers differ, decoded, cut to ``chars`` characters."""
    by_id = {r["id"]: r for r in tuned}
    out = []
    for r in original:
        t = by_id.get(r["id"])
        if t is None or t["output_token_ids"] == r["output_token_ids"]:
            continue
        out.append({"id": r["id"],
                    "prompt": tokenizer.decode(r["prompt_token_ids"], skip_special_tokens=True)[-chars:],
                    "original": tokenizer.decode(r["output_token_ids"], skip_special_tokens=True)[:chars],
                    "tuned": tokenizer.decode(t["output_token_ids"], skip_special_tokens=True)[:chars]})
        if len(out) == n:
            break
    return out


def load_tree(path: str | os.PathLike) -> list[list[int]]:
    """A tree as a list of index paths, from a ``tree.json``."""
    tree = json.loads(Path(path).read_text())
    if not isinstance(tree, list) or not all(isinstance(p, list) for p in tree):
        raise ValueError(f"{path}: not a tree (a JSON list of index paths)")
    return tree


def compare(original: str | os.PathLike, tuned: str | os.PathLike, work_dir: str | os.PathLike, *,
            baseline_heads: Sequence[str | os.PathLike] = (), trees: dict[str, Sequence[Sequence[int]]] | None = None,
            max_tokens: int = 256, kv_cache_gb: int = 4, examples: int = 3) -> dict[str, Any]:
    """Quality of ``tuned`` against ``original`` on MT-Bench, and (with ``baseline_heads`` and
    ``trees``) replayed acceptance of each baseline's heads on the original vs ``tuned``'s own heads."""
    from transformers import AutoTokenizer

    from .evaluate import generate_mtbench_answers, replay_answers

    work = Path(work_dir)
    # Both models' answers in the tuned model's dtype, named explicitly: vLLM's "auto" runs a
    # float32 checkpoint in bf16, and agreement should measure training, not arithmetic.
    dtype = model_dtype(tuned)
    orig_work = work / f"compare-original-{dtype}"
    orig_file = generate_mtbench_answers(original, orig_work / "mtbench-answers.jsonl", max_tokens=max_tokens,
                                         kv_cache_gb=kv_cache_gb, dtype=dtype)
    tuned_work = tuned_work_dir(work, tuned)
    tuned_file = generate_mtbench_answers(tuned, tuned_work / "mtbench-answers.jsonl", max_tokens=max_tokens,
                                          kv_cache_gb=kv_cache_gb, dtype=dtype)
    orig_recs, tuned_recs = read_records(orig_file), read_records(tuned_file)
    result: dict[str, Any] = {
        "original": str(original), "tuned": str(tuned), "max_tokens": max_tokens, "dtype": dtype,
        "teacher_forced": teacher_forced_quality(original, tuned, orig_recs),
        "greedy": greedy_agreement(orig_recs, tuned_recs),
        "examples": side_by_side(AutoTokenizer.from_pretrained(str(original)), orig_recs, tuned_recs, examples),
    }
    result["acceptance"] = []
    for name, tree in (trees or {}).items():
        new = replay_answers(tuned, tuned, tuned_file, tuned_work, tree)
        for heads in baseline_heads:
            base = replay_answers(original, heads, orig_file, orig_work, tree)
            result["acceptance"].append({"tree": name, "nodes": len(tree), "baseline_heads": str(heads),
                                         "baseline": base["tree"], "tuned": new["tree"],
                                         "ratio": new["tree"] / base["tree"],
                                         "baseline_top1": base["top1"], "tuned_top1": new["top1"]})
    return result


def model_dtype(model: str | os.PathLike) -> str:
    """The dtype a checkpoint's config.json names (what vLLM's ``dtype="auto"`` runs it in)."""
    config = json.loads((Path(model) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def tuned_work_dir(work: Path, tuned: str | os.PathLike) -> Path:
    """Where a tuned model's MT-Bench answers and features live (shared by evaluate and compare)."""
    return work / f"medusa2-{Path(tuned).name}"


def format_comparison(result: dict[str, Any]) -> str:
    """The numbers of ``compare`` as a short report."""
    tf, gr = result["teacher_forced"], result["greedy"]
    lines = [f"both models in {result['dtype']}",
             f"teacher-forced on the original's greedy MT-Bench answers ({tf['tokens']} tokens): "
             f"KL(original || tuned) {tf['kl_per_token']:.4f} nats/token, argmax agreement "
             f"{tf['argmax_agreement']:.4f}",
             f"greedy answers ({gr['answers']}, <= {result['max_tokens']} tokens): identical "
             f"{gr['identical_answers']:.3f}, original's tokens before the first difference "
             f"{gr['prefix_share']:.3f}, position-wise identical {gr['positionwise_share']:.3f}"]
    for acc in result.get("acceptance", []):
        lines.append(f"replayed acceptance per step, tree {acc['tree']}: {acc['baseline_heads']} on the "
                     f"original {acc['baseline']:.3f}, tuned heads on the tuned model {acc['tuned']:.3f} "
                     f"({acc['ratio']:.3f}x); head top-1 "
                     + "/".join(f"{a:.3f}" for a in acc["baseline_top1"]) + " -> "
                     + "/".join(f"{a:.3f}" for a in acc["tuned_top1"]))
    for ex in result["examples"]:
        lines += [f"--- {ex['id']}", f"original: {ex['original']!r}", f"tuned:    {ex['tuned']!r}"]
    return "\n".join(lines)
