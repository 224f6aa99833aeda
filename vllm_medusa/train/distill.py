"""Training records: the base model's own answers to ShareGPT (or MT-Bench) prompts, or ShareGPT's text.

Medusa heads must predict what *this* model will say next, so they are trained on its own outputs
(Medusa paper, section 3.3) rather than on the human answers of the data set. Answers are written
to a jsonl file, one record per prompt, appended chunk by chunk so an interrupted run resumes where
it stopped; ``archive_records`` copies complete chunks into gzipped shards that can be committed,
and ``restore_records`` brings them back on a fresh machine. ``sharegpt_text`` writes the same
prompts with the data set's own answers instead (no generation): with ``features --labels model``
the labels are still the model's own tokens, taken teacher-forced along that text, which costs one
forward pass instead of decoding:

    {"id": "sharegpt-17", "prompt_token_ids": [...], "output_token_ids": [...], "finish_reason": "stop"}
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def _jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with these records in one step (a crash leaves the old file whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(_jsonl(records))
    os.replace(tmp, path)


SHARD_RECORDS = 512


def _shard_path(archive_dir: Path, index: int) -> Path:
    return archive_dir / f"part-{index:05d}.jsonl.gz"


def _read_shard(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def archive_records(records_file: str | os.PathLike, archive_dir: str | os.PathLike,
                    shard_records: int = SHARD_RECORDS, final: bool = False) -> list[Path]:
    """Copy each complete run of ``shard_records`` records of ``records_file`` not yet archived into
    ``archive_dir/part-NNNNN.jsonl.gz``; returns the new shards. ``final`` (the run has answered
    every prompt): the records after the last complete run go into a shorter last shard, which a
    later, longer run rewrites as its run fills up.

    Generation is the expensive stage (hours on a CPU) and the work dir is a cache, so the records
    are kept in a form small enough to commit. The bytes are deterministic (gzip mtime 0), so
    re-archiving the same records changes nothing; an existing shard whose ids differ from the file's
    is an error rather than a silent mix of two runs.
    """
    archive_dir = Path(archive_dir)
    records = read_records(records_file)
    new = []
    count = -(-len(records) // shard_records) if final else len(records) // shard_records
    for index in range(count):
        chunk = records[index * shard_records:(index + 1) * shard_records]
        path = _shard_path(archive_dir, index)
        if path.is_file():
            have = [r["id"] for r in _read_shard(path)]
            want = [r["id"] for r in chunk]
            if have != want[:len(have)]:  # a shorter shard is an earlier run's last one: refilled below
                raise ValueError(f"{path} holds other records than {records_file} (first id {have[:1]} vs "
                                 f"{chunk[0]['id']!r}): archive into a fresh directory")
            if len(have) == len(want):
                continue
        archive_dir.mkdir(parents=True, exist_ok=True)
        payload = _jsonl(chunk).encode()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
            fh.write(payload)
        os.replace(tmp, path)
        new.append(path)
    return new


def restore_records(archive_dir: str | os.PathLike, records_file: str | os.PathLike) -> int:
    """Rebuild ``records_file`` from the archived shards when they hold records it lacks (a fresh
    machine), keeping its own records that are not archived; returns the records restored."""
    archive_dir, records_file = Path(archive_dir), Path(records_file)
    shards = sorted(archive_dir.glob("part-*.jsonl.gz"))
    archived = [r for path in shards for r in _read_shard(path)]
    local = read_records(records_file)
    have = {r["id"] for r in local}
    missing = [r for r in archived if r["id"] not in have]
    if not missing:
        return 0
    ids = {r["id"] for r in archived}
    _write_records(records_file, archived + [r for r in local if r["id"] not in ids])
    return len(missing)


def _chat_ids(tokenizer: Any, message: str | Sequence[dict[str, str]]) -> list[int]:
    messages = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    return list(ids)


def sharegpt_prompts(tokenizer: Any, num_samples: int, max_prompt_tokens: int) -> list[Prompt]:
    """ShareGPT prompts, chat-formatted and tokenized: see ``iter_sharegpt_prompts``."""
    from vllm_medusa.data import load_sharegpt

    return list(itertools.islice(iter_sharegpt_prompts(tokenizer, load_sharegpt(), max_prompt_tokens),
                                 num_samples))


_ROLES = {"human": "user", "gpt": "assistant"}


def iter_sharegpt_prompts(tokenizer: Any, conversations: Sequence[dict[str, Any]],
                          max_prompt_tokens: int) -> Iterator[Prompt]:
    """Every distinct first human turn (``Prompt.id`` ``sharegpt-<index in conversations>``), then
    the later human turns with the conversation so far as history (``sharegpt-<index>-t<turn>``,
    all second turns before any third), skipping duplicates and prompts longer than
    ``max_prompt_tokens`` (long prompts cost prefill time and teach the heads little).

    First turns alone give about 1.8M answer tokens at 256; later turns extend that. The order is
    fixed, first turns first, so a run resumed with a larger ``num_samples`` extends the same list.
    """
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
    seen_histories: set[tuple[str, ...]] = set()
    too_long: set[int] = set()  # a history over the limit stays over it at every later turn
    max_turn = max((len(c.get("conversations") or []) - 1) // 2 for c in conversations) if conversations else 0
    for turn in range(1, max_turn + 1):
        for i, conv in enumerate(conversations):
            messages = None if i in too_long else _history(conv.get("conversations") or [], turn)
            if messages is None:
                continue
            key = tuple(m["content"] for m in messages)
            if key in seen_histories:
                continue
            seen_histories.add(key)
            ids = _chat_ids(tokenizer, messages)
            if len(ids) <= max_prompt_tokens:
                yield Prompt(f"sharegpt-{i}-t{turn}", ids)
            else:
                too_long.add(i)


def _history(turns: Sequence[dict[str, Any]], turn: int) -> list[dict[str, str]] | None:
    """The messages up to human turn ``turn`` (0-based), or None unless the turns alternate human,
    gpt, ... with text up to there."""
    if len(turns) < 2 * turn + 1:
        return None
    messages = []
    for k, t in enumerate(turns[:2 * turn + 1]):
        role = _ROLES.get(t.get("from", ""))
        text = (t.get("value") or "").strip()
        if role != ("user" if k % 2 == 0 else "assistant") or not text:
            return None
        messages.append({"role": role, "content": text})
    return messages


def _answer_turn(prompt_id: str) -> tuple[int, int]:
    """(conversation index, index of the answering turn) of a ShareGPT prompt id."""
    index, _, turn = prompt_id.removeprefix("sharegpt-").partition("-t")
    return int(index), 2 * int(turn or 0) + 1


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
                     seed: int = 0, desc: str = "distill", on_chunk: Callable[[], Any] | None = None) -> Path:
    """Generate answers for the prompts not yet in ``out_file`` and append them, chunk by chunk
    (``on_chunk`` runs after each chunk is on disk)."""
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
            if on_chunk is not None:
                on_chunk()
            bar.update(len(chunk))
            bar.set_postfix(tokens=n_tokens)
    bar.close()
    return out_file


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (avx512_bf16 or AMX; Linux flags, else False)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def distill_dtype() -> str:
    """vLLM's ``auto`` (the checkpoint's dtype) on GPUs and on CPUs with native bf16, float32 on
    other CPUs. Without native bf16 vLLM decodes bf16 2.8x slower than float32 (60 vs 167 answer
    tokens/s for the demo model at batch 64, measured 2026-12-03); with AMX, bf16 is the faster one
    (docs/training.md). The answers are the same model's greedy ones either way, apart from near-ties."""
    import torch

    return "auto" if torch.cuda.is_available() or native_bf16() else "float32"


def distill(model: str | os.PathLike, out_file: str | os.PathLike, *, num_samples: int = 2000,
            max_tokens: int = 256, max_prompt_tokens: int = 512, temperature: float = 0.0,
            chunk_size: int | None = None, max_num_seqs: int = 128, kv_cache_gb: int = 4, seed: int = 0,
            dtype: str | None = None, archive_dir: str | os.PathLike | None = None) -> Path:
    """Generate (or finish generating) ``num_samples`` self-distilled ShareGPT answers.

    ``dtype``: the engine's dtype, by default ``distill_dtype()``. ``chunk_size`` (default 4 x
    ``max_num_seqs``): prompts per ``generate`` call, the unit of resumption; the batch drains at
    the end of each chunk, so larger chunks keep it fuller. ``archive_dir``: restore from and
    archive into these shards (``archive_records``) as chunks finish.
    """
    from transformers import AutoTokenizer

    if archive_dir is not None:
        restore_records(archive_dir, out_file)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = sharegpt_prompts(tokenizer, num_samples, max_prompt_tokens)
    done = {r["id"] for r in read_records(out_file)}
    if not all(p.id in done for p in prompts):
        llm = build_llm(model, max_model_len=max_prompt_tokens + max_tokens, max_num_seqs=max_num_seqs,
                        kv_cache_gb=kv_cache_gb, seed=seed, dtype=dtype or distill_dtype())
        try:
            generate_answers(llm, prompts, out_file, max_tokens=max_tokens, temperature=temperature,
                             chunk_size=chunk_size or 4 * max_num_seqs, seed=seed,
                             on_chunk=None if archive_dir is None else lambda: archive_records(out_file, archive_dir))
        finally:
            shutdown_engine(llm)
    if archive_dir is not None:
        archive_records(out_file, archive_dir, final=True)
    return Path(out_file)


def sharegpt_text(model: str | os.PathLike, out_file: str | os.PathLike, *, num_samples: int = 2000,
                  max_tokens: int = 256, max_prompt_tokens: int = 512) -> Path:
    """Records of the first ``num_samples`` ShareGPT prompts (the ones ``distill`` answers) with the
    data set's own answer to them, cut to ``max_tokens``; prompts without one are skipped."""
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
        index, k = _answer_turn(prompt.id)
        turns = conversations[index]["conversations"]
        answer = (turns[k].get("value") or "").strip() if len(turns) > k and turns[k].get("from") == "gpt" else ""
        if not answer:
            continue
        ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        records.append({"id": prompt.id, "prompt_token_ids": prompt.token_ids,
                        "output_token_ids": ids[:max_tokens],
                        "finish_reason": "length" if len(ids) > max_tokens else "stop"})
        if len(records) >= num_samples:
            break
    _write_records(out_file, records)
    return out_file


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Counts for reports: answers, of which to later conversation turns, prompt/answer tokens,
    share of answers cut at max_tokens."""
    recs = list(records)
    n = max(len(recs), 1)
    return {
        "answers": len(recs),
        "later_turns": sum(str(r.get("id", "")).startswith("sharegpt-") and _answer_turn(r["id"])[1] > 1
                           for r in recs),
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in recs),
        "answer_tokens": sum(len(r["output_token_ids"]) for r in recs),
        "cut_at_max_tokens": sum(r.get("finish_reason") == "length" for r in recs) / n,
    }
