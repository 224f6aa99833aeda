"""Run bookkeeping: per-stage wall times in ``run.json`` and the TRAINING.md shipped with heads."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .evaluate import format_result


class RunLog:
    """``run.json`` in the work dir: settings, data sizes and wall time of each stage run."""

    def __init__(self, work_dir: str | os.PathLike):
        self.path = Path(work_dir) / "run.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def update(self, **entries: Any) -> None:
        self.data.update(entries)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    @contextmanager
    def stage(self, name: str, command: str = "") -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict collects the stage's own facts.

        A stage that sets ``info["cached"]`` found its output already on disk: the wall time of the
        run that produced it is kept, so a rerun of ``all`` still reports real costs; a stage that
        sets ``info["resumed"]`` adds its time to the interrupted run's.
        """
        info: dict[str, Any] = {"command": command}
        t0 = time.time()
        yield info
        info["seconds"] = round(time.time() - t0, 1)
        stages = self.data.setdefault("stages", {})
        old = stages.get(name)
        cached, resumed = info.pop("cached", False), info.pop("resumed", False)
        if cached and old:
            old.update({k: v for k, v in info.items() if k not in ("seconds", "command")})
        else:
            if resumed and old:
                info["seconds"] = round(info["seconds"] + old.get("seconds", 0), 1)
            stages[name] = info
        self.save()


def _commands(stages: dict[str, Any]) -> list[str]:
    """The distinct commands that produced the stages, in pipeline order."""
    seen: list[str] = []
    for name in ("distill", "features", "train", "evaluate"):
        c = stages.get(name, {}).get("command")
        if c and c not in seen:
            seen.append(c)
    return seen


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def write_training_md(out_dir: str | os.PathLike, run: dict[str, Any]) -> Path:
    """TRAINING.md: exact command, data, settings, stage times, accuracies, predicted acceptance,
    and notes: the file's own ``## Notes`` section if it has one, else the ``notes`` in run.json."""
    stages = run.get("stages", {})
    ev = run.get("evaluation") or {}
    data = stages.get("distill", {}).get("data", {})
    lines = [
        f"# Medusa heads for {run.get('model_name', 'the base model')}",
        "",
        ("Token-conditioned " if run.get("settings", {}).get("token_conditioned") else "")
        + "Medusa-1 heads (backbone frozen, residual blocks trained, base `lm_head` shared) trained by "
        "self-distillation with `python -m vllm_medusa.train`.",
        "",
        "## Commands",
        "",
        "```",
        *_commands(stages),
        "```",
        "",
        "## Data",
        "",
        f"- Training: the base model's own answers to {data.get('answers', '?')} ShareGPT prompts "
        + (f"({data['later_turns']} of them later turns, with the conversation so far as history; "
           if data.get("later_turns") else "(first turns; ") +
        f"chat template, temperature {run.get('settings', {}).get('temperature', '?')}, "
        f"<= {run.get('settings', {}).get('max_tokens', '?')} new tokens, prompts <= "
        f"{run.get('settings', {}).get('max_prompt_tokens', '?')} tokens): "
        f"{data.get('answer_tokens', '?')} answer tokens, {data.get('prompt_tokens', '?')} prompt tokens, "
        f"{100 * data.get('cut_at_max_tokens', 0):.0f}% of answers cut at the token limit.",
        f"- Held-out (accuracies, tree): greedy answers of the base model to the 80 MT-Bench questions, "
        f"both turns as single-turn prompts: {ev.get('answers', '?')} answers, {ev.get('positions', '?')} "
        "positions. None of these prompts is in the training data.",
        "",
        "## Settings",
        "",
        "```",
        json.dumps(run.get("settings", {}), indent=2),
        "```",
        "",
        "## Wall time (2 shared CPU cores)",
        "",
        "| stage | wall time |",
        "|---|---|",
    ]
    for name in ("distill", "features", "train", "evaluate"):
        if name in stages:
            lines.append(f"| {name} | {_minutes(stages[name].get('seconds'))} |")
    train = stages.get("train", {})
    settings = run.get("settings", {})
    if train:
        lines += ["", "## Training", "",
                  f"- {train.get('steps')} steps of {run.get('settings', {}).get('batch_size')} positions, "
                  f"{train.get('train_positions')} training positions, final train loss "
                  f"{train.get('final_train_loss', float('nan')):.3f}, held-out (ShareGPT split) loss "
                  f"{train.get('heldout_loss', float('nan')):.3f}."]
        if settings.get("softmax_vocab") == "data":
            which = ("most frequent tokens of the training answers (`--softmax-vocab data --softmax-size`; "
                     "rarer targets are left out of the loss)" if settings.get("softmax_size") else
                     "distinct tokens of the training answers (`--softmax-vocab data`)")
            lines.append(f"- Training softmax over the {train.get('softmax_size', '?')} {which}, several "
                         "times cheaper than the full vocabulary on this CPU; every accuracy below is over "
                         "the full vocabulary.")
            if settings.get("draft_vocab"):
                lines.append(f"- The heads draft from the {settings['draft_vocab']} most frequent of those "
                             "tokens (`--draft-vocab`, their `token_map`): a smaller projection per step.")
        if train.get("heldout_topk"):
            lines.append("- ShareGPT held-out split top-1 per head: "
                         + ", ".join(f"{row[0]:.3f}" for row in train["heldout_topk"]))
    if ev:
        lines += ["", "## MT-Bench held-out accuracy and acceptance", "",
                  "Top-k is cumulative (true token among the head's k best guesses). *Predicted* is "
                  "`trees.expected_acceptance_length` (independent heads, per position); *per position* "
                  "walks each tree on every real held-out position; *per step* replays greedy "
                  "decoding step by step, jumping over accepted tokens: that is what the engine "
                  "reports as mean acceptance length, and it is lower because easy stretches are "
                  "crossed in fewer steps. All count the base model's own token, so a step without "
                  "speculation is 1.0.", "", "```", format_result(ev), "```", "",
                  f"`tree.json` is `optimal_tree(accuracies, {ev.get('tree_budget')})`; "
                  "`accuracies.json` holds `accuracies[k][i]`, the per-rank (not cumulative) share of "
                  "positions where head k's (i+1)-th guess is right."]
    out = Path(out_dir) / "TRAINING.md"
    if out.is_file() and "\n## Notes\n" in (old := out.read_text()):
        # The folder's own notes (often edited by hand) win: run.json lives in a work directory
        # that other heads may share, and a rerun of a stage must not drop them.
        lines += ["", "## Notes", "", old.split("\n## Notes\n", 1)[1].strip("\n")]
    elif run.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run["notes"]]
    out.write_text("\n".join(lines) + "\n")
    return out
