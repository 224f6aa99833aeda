"""Training records: the base model's own answers to ShareGPT (or MT-Bench) prompts, or ShareGPT's text.

Medusa heads must predict what *this* model will say next, so they are trained on its own outputs
(Medusa paper, section 3.3) rather than on the human answers of the data set. Answers are written
to a jsonl file, one record per prompt, appended chunk by chunk so an interrupted run resumes where
it stopped. ``sharegpt_text`` writes the same prompts with the data set's own answers instead (no
generation): with ``features --labels model`` the labels are still the model's own tokens, taken
teacher-forced along that text, which costs one forward pass instead of decoding:

    {"id": "sharegpt-17", "prompt_token_ids": [...], "output_token_ids": [...], "finish_reason": "stop"}
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm import tqdm


def engine_env(kv_cache_gb: int = 4) -> None:
    """Environment a CPU vLLM engine needs here (left alone when the caller already set it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))


@dataclass
class Prompt:
    id: str
    token_ids: list[int]


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a distillation file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with path.open() as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _chat_ids(tokenizer: Any, message: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=True,
                                        add_generation_prompt=True)
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    return list(ids)


def sharegpt_prompts(tokenizer: Any, num_samples: int, max_prompt_tokens: int) -> list[Prompt]:
    """First human turns of ShareGPT, chat-formatted and tokenized, skipping duplicates and prompts
    longer than ``max_prompt_tokens`` (long prompts cost prefill time and teach the heads little)."""
    from vllm_medusa.data import load_sharegpt

    return list(itertools.islice(iter_sharegpt_prompts(tokenizer, load_sharegpt(), max_prompt_tokens),
                                 num_samples))


def iter_sharegpt_prompts(tokenizer: Any, conversations: Sequence[dict[str, Any]],
                          max_prompt_tokens: int) -> Iterator[Prompt]:
    """``sharegpt_prompts`` one at a time; ``Prompt.id`` is ``sharegpt-<index in conversations>``."""
    seen: set[str] = set()
    for i, conv in enumerate(conversations):
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if not text or text in seen:
            continue
        seen.add(text)
        ids = _chat_ids(tokenizer, text)
        if len(ids) <= max_prompt_tokens:
            yield Prompt(f"sharegpt-{i}", ids)


def mtbench_prompts(tokenizer: Any, turns: Sequence[int] = (0, 1)) -> list[Prompt]:
    """MT-Bench questions as single-turn prompts (turn 1 without the first answer, for variety)."""
    from vllm_medusa.data import load_mtbench

    return [Prompt(f"mtbench-{q['question_id']}-t{t}", _chat_ids(tokenizer, q["turns"][t]))
            for t in turns for q in load_mtbench()]


def _chunks(items: Sequence[Prompt], size: int) -> Iterator[Sequence[Prompt]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def build_llm(model: str | os.PathLike, *, max_model_len: int, max_num_seqs: int = 64,
              kv_cache_gb: int = 4, seed: int = 0, **kwargs: Any) -> Any:
    """A plain vLLM engine for generating answers (call under ``if __name__ == "__main__"``)."""
    engine_env(kv_cache_gb)
    from vllm import LLM

    return LLM(model=str(model), max_model_len=max_model_len, max_num_seqs=max_num_seqs,
               enforce_eager=kwargs.pop("enforce_eager", True), seed=seed, dtype=kwargs.pop("dtype", "auto"),
               **kwargs)


def shutdown_engine(llm: Any) -> None:
    """Stop an ``LLM``'s engine-core process now: left to garbage collection it keeps polling (a
    third of a core here) and holding its KV cache while later stages run the backbone."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def generate_answers(llm: Any, prompts: Sequence[Prompt], out_file: str | os.PathLike, *,
                     max_tokens: int = 256, temperature: float = 0.0, chunk_size: int = 256,
                     seed: int = 0, desc: str = "distill") -> Path:
    """Generate answers for the prompts not yet in ``out_file`` and append them, chunk by chunk."""
    from vllm import SamplingParams

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_records(out_file)}
    todo = [p for p in prompts if p.id not in done]
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed if temperature > 0 else None)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc, unit="answer",
               mininterval=0.5 if sys.stderr.isatty() else 30)
    n_tokens = 0
    with out_file.open("a") as fh:
        for chunk in _chunks(todo, chunk_size):
            results = llm.generate([{"prompt_token_ids": p.token_ids} for p in chunk], params, use_tqdm=False)
            for p, res in zip(chunk, results):
                comp = res.outputs[0]
                rec = {"id": p.id, "prompt_token_ids": p.token_ids,
                       "output_token_ids": list(comp.token_ids), "finish_reason": comp.finish_reason}
                fh.write(json.dumps(rec) + "\n")
                n_tokens += len(comp.token_ids)
            fh.flush()
            bar.update(len(chunk))
            bar.set_postfix(tokens=n_tokens)
    bar.close()
    return out_file


def distill_dtype() -> str:
    """float32 on CPUs, vLLM's ``auto`` (the checkpoint's dtype) on GPUs. On a CPU without native
    bf16 (avx512_bf16 / AMX) vLLM decodes bf16 2.8x slower than float32 (60 vs 167 answer tokens/s
    for the demo model at batch 64, measured 2026-12-03), and the answers are the same model's
    greedy ones either way, apart from near-ties."""
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def distill(model: str | os.PathLike, out_file: str | os.PathLike, *, num_samples: int = 2000,
            max_tokens: int = 256, max_prompt_tokens: int = 512, temperature: float = 0.0,
            chunk_size: int | None = None, max_num_seqs: int = 128, kv_cache_gb: int = 4, seed: int = 0,
            dtype: str | None = None) -> Path:
    """Generate (or finish generating) ``num_samples`` self-distilled ShareGPT answers.

    ``dtype``: the engine's dtype, by default ``distill_dtype()``. ``chunk_size`` (default 4 x
    ``max_num_seqs``): prompts per ``generate`` call, the unit of resumption; the batch drains at
    the end of each chunk, so larger chunks keep it fuller.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = sharegpt_prompts(tokenizer, num_samples, max_prompt_tokens)
    done = {r["id"] for r in read_records(out_file)}
    if all(p.id in done for p in prompts):
        return Path(out_file)
    llm = build_llm(model, max_model_len=max_prompt_tokens + max_tokens, max_num_seqs=max_num_seqs,
                    kv_cache_gb=kv_cache_gb, seed=seed, dtype=dtype or distill_dtype())
    try:
        return generate_answers(llm, prompts, out_file, max_tokens=max_tokens, temperature=temperature,
                                chunk_size=chunk_size or 4 * max_num_seqs, seed=seed)
    finally:
        shutdown_engine(llm)


def sharegpt_text(model: str | os.PathLike, out_file: str | os.PathLike, *, num_samples: int = 2000,
                  max_tokens: int = 256, max_prompt_tokens: int = 512) -> Path:
    """Records of the first ``num_samples`` ShareGPT first turns (the prompts ``distill`` answers)
    with the data set's own first answer, cut to ``max_tokens``; prompts without one are skipped."""
    from transformers import AutoTokenizer

    from vllm_medusa.data import load_sharegpt

    out_file = Path(out_file)
    if len(read_records(out_file)) >= num_samples:
        return out_file
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    conversations = load_sharegpt()
    records = []
    for prompt in tqdm(iter_sharegpt_prompts(tokenizer, conversations, max_prompt_tokens), total=num_samples,
                       desc="sharegpt text", unit="prompt", mininterval=0.5 if sys.stderr.isatty() else 30):
        turns = conversations[int(prompt.id.removeprefix("sharegpt-"))]["conversations"]
        answer = (turns[1].get("value") or "").strip() if len(turns) > 1 and turns[1].get("from") == "gpt" else ""
        if not answer:
            continue
        ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        records.append({"id": prompt.id, "prompt_token_ids": prompt.token_ids,
                        "output_token_ids": ids[:max_tokens],
                        "finish_reason": "length" if len(ids) > max_tokens else "stop"})
        if len(records) >= num_samples:
            break
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out_file)
    return out_file


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Counts for reports: answers, prompt/answer tokens, share of answers cut at max_tokens."""
    recs = list(records)
    n = max(len(recs), 1)
    return {
        "answers": len(recs),
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in recs),
        "answer_tokens": sum(len(r["output_token_ids"]) for r in recs),
        "cut_at_max_tokens": sum(r.get("finish_reason") == "length" for r in recs) / n,
    }
