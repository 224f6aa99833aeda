"""Learning curve of the heads: held-out MT-Bench accuracy and replayed acceptance per step against
the number of training answer tokens, per data source and per kind of target.

Each point trains 5 token-conditioned heads for one epoch with a draft vocabulary of 4096 (the shipped
demo heads' recipe with ``--layers 2 --softmax-size 8192``) on the first records of a features
directory (prefixes, so every larger set contains the smaller ones), then evaluates them on the
base model's greedy MT-Bench answers as `train evaluate` does: top-1 per head, and the mean tokens
per step that the heads' own 4- and 16-node trees (and the 4-node tree with the prompt-lookup
branch) give when replayed.

``--modes chained`` trains each point by continuing the previous point's heads (saved in bf16 and
reloaded, as ``train train --init-heads`` does) on only the answers added since: the whole curve
costs one pass over the data, and it measures how training continued chunk by chunk compares with
training from scratch (``scratch``, the default) on the same answers.

``--conditioning bonus,path`` compares what the heads are conditioned on: the token just produced,
for every head (``bonus``, the shipped heads), or the token just before each head's target
(``path``: `train --path-conditioned`).

    .venv/bin/python bench/learning_curve.py --data self-distilled=.cache/train/smollm2-135m-instruct/features \
        --sizes 60k,150k,300k --targets hard,soft
    .venv/bin/python bench/learning_curve.py --data self-distilled=.cache/train/smollm2-135m-instruct/features \
        --sizes 100k,200k,400k --modes scratch,chained
    .venv/bin/python bench/learning_curve.py --data self-distilled=.cache/train/smollm2-135m-instruct/features \
        --sizes 400k --layers 2 --conditioning bonus,path

Results (JSON, a markdown table, a PNG) go to bench/results/NAME/; a rerun with the same folder
skips the points already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import default_model, md_table, results_dir, setup_env, write_json  # noqa: E402


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _line(q: dict[str, Any]) -> tuple[str, str, str, str]:
    """What a point is a point of: (data, targets, mode, conditioning); a line in the plot."""
    return q["data"], q["targets"], q["mode"], q["conditioning"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model folder (default: the demo model)")
    p.add_argument("--data", action="append", required=True, metavar="NAME=FEATURES_DIR",
                   help="a features directory (`train features`) and its name in the table; repeatable")
    p.add_argument("--sizes", default="60k", help="training answer tokens per point, e.g. 60k,300k,1M "
                                                 "(a size past what a directory holds is skipped)")
    p.add_argument("--targets", default="hard", help="hard (the greedy token), soft (the base distribution), or both")
    p.add_argument("--modes", default="scratch", help="scratch (each point trained from identity blocks), "
                   "chained (each point continues the previous one on the answers added since), or both")
    p.add_argument("--conditioning", default="bonus", help="bonus (every head sees the token just produced), "
                   "path (head k sees the token before its target), or both")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--softmax-size", type=int, default=None,
                   help="train the softmax over only the N most frequent answer tokens (the shipped heads: 8192)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of each point (a chained point "
                   "continuing earlier heads included)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--eval-dir", default=None,
                   help="folder with the MT-Bench answers and features of `train evaluate` (default: the "
                        "model's train work dir; generated there if missing)")
    p.add_argument("--eval-max-tokens", type=int, default=256)
    p.add_argument("--name", help="results folder name under bench/results/ (default: a timestamp)")
    p.add_argument("--out", help="results folder (overrides --name)")
    args = p.parse_args()
    setup_env()

    import torch
    from tqdm import tqdm

    from vllm_medusa.demo import cache_root
    from vllm_medusa.heads import save_medusa_heads
    from vllm_medusa.train.evaluate import evaluate_heads, mtbench_eval_data
    from vllm_medusa.train.features import load_features
    from vllm_medusa.train.trainer import TrainConfig, train_heads

    model = args.model or default_model()
    eval_dir = Path(args.eval_dir) if args.eval_dir else cache_root() / "train" / Path(model).name
    answers, eval_features = mtbench_eval_data(model, eval_dir, max_tokens=args.eval_max_tokens)

    out = results_dir(args.out, args.name)
    result_file = out / "learning_curve.json"
    points: list[dict[str, Any]] = json.loads(result_file.read_text())["points"] if result_file.is_file() else []
    for q in points:  # points written before --modes, --lr and --conditioning existed
        q.setdefault("mode", "scratch")
        q.setdefault("lr", 3e-3)
        q.setdefault("conditioning", "bonus")
    done = {(*_line(q), q["size"]) for q in points}
    sources = dict(item.split("=", 1) for item in args.data)
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    targets = args.targets.split(",")
    runs = [(name, t, mode, cond, size) for name in sources for t in targets for mode in args.modes.split(",")
            for cond in args.conditioning.split(",") for size in sizes]
    loaded: dict[str, Any] = {}  # each features directory read once, not once per point

    def chain_dir(name: str, kind: str, cond: str, size: int) -> Path:
        return out / f"heads-{name}-{kind}-{cond}-chained-{size}"

    for name, kind, mode, cond, size in tqdm(runs, desc="learning curve", unit="point"):
        if (name, kind, mode, cond, size) in done:
            continue
        if name not in loaded:
            loaded = {name: load_features(sources[name])}  # runs are grouped by source: keep one in memory
        feats = loaded[name]
        n_records = int((torch.cumsum(feats.lengths, 0) < size).sum()) + 1
        if n_records > len(feats.lengths):
            print(f"{name}: {int(feats.lengths.sum())} answer tokens, fewer than {size}: skipped")
            continue
        cfg = TrainConfig(num_heads=5, num_layers=args.layers, lr=args.lr, epochs=args.epochs, batch_size=256,
                          heldout_fraction=0.02, softmax_vocab="data", draft_vocab=4096,
                          softmax_size=args.softmax_size,
                          token_conditioned=True, path_conditioned=cond == "path",
                          soft_targets=kind == "soft")
        init, start = None, 0
        if mode == "chained":
            earlier = [q for q in points if _line(q) == (name, kind, mode, cond) and q["size"] < size]
            if earlier:
                last = max(earlier, key=lambda q: q["size"])
                init, start = chain_dir(name, kind, cond, last["size"]), last["records"]
        t0 = time.time()
        result = train_heads(feats.slice(start, n_records), cfg, init=init)
        seconds = time.time() - t0
        with tempfile.TemporaryDirectory() as tmp:
            heads_dir = chain_dir(name, kind, cond, size) if mode == "chained" else Path(tmp)
            save_medusa_heads(result.heads, heads_dir, model, dtype=torch.bfloat16)
            ev = evaluate_heads(model, heads_dir, eval_features, write=False, answers_file=answers)
        points.append({"data": name, "targets": kind, "mode": mode, "conditioning": cond, "lr": args.lr,
                       "size": size, "records": n_records,
                       "answer_tokens": int(feats.lengths[:n_records].sum()),
                       "train_positions": result.train_positions, "train_seconds": round(seconds, 1),
                       "top1": [row[0] for row in ev["topk"]], "chain_per_step": ev["chain_per_step"],
                       "per_step_4": ev["budgets"][4]["per_step"], "per_step_16": ev["budgets"][16]["per_step"],
                       "per_step_4_lookup": ev["budgets"][4].get("per_step_lookup"),
                       "eval_positions": ev["positions"]})
        write_json(result_file, {"model": model, "layers": args.layers, "epochs": args.epochs,
                                 "softmax_size": args.softmax_size,
                                 "eval_answers": str(answers), "points": points})
    write_outputs(out, points)
    print((out / "learning_curve.md").read_text())


def _tokens(point: dict[str, Any]) -> int:
    """Answer tokens the point's heads have seen (a chained point's ``train_positions`` counts only
    its own chunk)."""
    return point.get("answer_tokens", point["train_positions"])


def write_outputs(out: Path, points: list[dict[str, Any]]) -> None:
    """The table and the plot (head-0 top-1 and 16-node acceptance against training tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda q: (*_line(q), q["size"]))
    rows = [[*_line(q), f"{q['lr']:g}", f"{q['records']}", f"{_tokens(q) / 1e3:.0f}k",
             f"{q['top1'][0]:.3f}", f"{q['top1'][1]:.3f}", f"{q['top1'][2]:.3f}",
             f"{q['chain_per_step']:.3f}" if "chain_per_step" in q else "-", f"{q['per_step_4']:.3f}",
             f"{q['per_step_16']:.3f}", f"{q['per_step_4_lookup']:.3f}", f"{q['train_seconds'] / 60:.1f}"]
            for q in points]
    header = ["data", "targets", "mode", "conditioning", "lr", "answers", "answer tokens", "head-0 top-1",
              "head-1 top-1", "head-2 top-1", "chain of 5", "4 nodes", "16 nodes", "4 nodes + lookup", "train min"]
    (out / "learning_curve.md").write_text(md_table(header, rows) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for line_key in sorted({_line(q) for q in points}):
        line = [q for q in points if _line(q) == line_key]
        xs = [_tokens(q) for q in line]
        axes[0].plot(xs, [q["top1"][0] for q in line], "o-", label=" / ".join(line_key))
        axes[1].plot(xs, [q["per_step_16"] for q in line], "o-", label=" / ".join(line_key))
    for ax, title in zip(axes, ("head-0 top-1 (MT-Bench)", "tokens per step, 16-node tree (replayed)")):
        ax.set_xscale("log")
        ax.set_xlabel("training answer tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)


if __name__ == "__main__":
    main()
