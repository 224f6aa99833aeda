"""Cache the frozen backbone's last hidden states so training epochs never rerun the backbone.

Medusa-1 keeps the base model frozen, so its hidden states are fixed inputs: computing them once
turns every epoch into a few small matmuls. Only answer positions are stored: the hidden state at
position t (prompt length - 1 <= t <= last answer position - 1) is what the heads see when the
token at t+1 has just been produced, and head k must then guess the token at t+2+k.

A features directory holds ``meta.json``, ``lm_head.pt`` (the base model's output projection, for
shared-lm_head training), ``embed_tokens.pt`` (its input embedding, for token-conditioned heads)
and ``shard-NNNNN.pt`` files, each a dict with ``ids`` (record ids),
``lengths`` (answer lengths), ``hidden`` ``[sum(lengths), H]`` and ``tokens`` (answer token ids).
Row ``j`` of a record's block is the hidden state that predicts answer token ``j`` with the base
``lm_head``; head k predicts answer token ``j + 1 + k``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from ..heads import path_tokens
from .distill import read_records

IGNORE = -100


def load_backbone(model_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """(decoder without lm_head, full causal-LM model) from a local HF checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    model.eval()
    return model.get_decoder(), model


def _batches(records: Sequence[dict[str, Any]], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into padded batches of at most ``max_batch_tokens`` (longest first)."""
    order = sorted(range(len(records)), key=lambda i: -_seq_len(records[i]))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = _seq_len(records[cur[0]]) if cur else _seq_len(records[i])
        if cur and longest * (len(cur) + 1) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _seq_len(rec: dict[str, Any]) -> int:
    return len(rec["prompt_token_ids"]) + len(rec["output_token_ids"])


def pad_batch(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with 0 into ``[B, longest]``, and the attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


@torch.inference_mode()
def hidden_states_for(decoder: Any, records: Sequence[dict[str, Any]],
                      max_batch_tokens: int = 8192) -> list[torch.Tensor]:
    """Per record, the last hidden states ``[len(answer), H]`` at positions P-1 .. P+m-2."""
    out: list[torch.Tensor | None] = [None] * len(records)
    device = next(decoder.parameters()).device
    for batch in _batches(records, max_batch_tokens):
        ids, mask = pad_batch([records[i]["prompt_token_ids"] + records[i]["output_token_ids"] for i in batch])
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for r, i in enumerate(batch):
            p = len(records[i]["prompt_token_ids"])
            m = len(records[i]["output_token_ids"])
            out[i] = hidden[r, p - 1:p - 1 + m].to("cpu").clone()
    return out  # type: ignore[return-value]


LABELS = ("answer", "model")


@torch.inference_mode()
def model_labels(hidden: torch.Tensor, lm_head: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The backbone's own greedy token at each row (``argmax`` of its logits), in chunks."""
    out = torch.empty(hidden.shape[0], dtype=torch.int32)
    w = lm_head.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk):
        out[start:start + chunk] = (hidden[start:start + chunk] @ w.T).argmax(-1).to(torch.int32)
    return out


def extract_features(model_path: str | os.PathLike, data_file: str | os.PathLike,
                     out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                     compute_dtype: torch.dtype | None = None, labels: str = "answer",
                     shard_size: int = 128, max_batch_tokens: int = 8192, limit: int | None = None,
                     start: int = 0, desc: str = "features") -> Path:
    """Run the backbone over every (prompt, answer) record and cache the answer hidden states.

    ``labels``: what the heads learn to predict. ``"answer"``: the record's tokens (self-distilled
    answers, or a data set's text as is). ``"model"``: teacher-forced self-distillation, the
    backbone's own greedy token at each position of the record's text (one forward pass, no
    generation: the labels of self-distillation at the cost of feature extraction alone). Row j
    then holds the token the model would produce there, which is also what token-conditioned heads
    see. ``compute_dtype``: the backbone's dtype for the forward pass, while shards are stored in
    ``dtype``; by default ``dtype``, except bf16 on a CPU without native bf16, where float32 is faster.

    Resumable: shards already on disk for the same data file, model and records are kept;
    ``limit`` takes only the first records (a prefix, so its shards are shared with longer runs);
    ``start`` (a multiple of ``shard_size``) skips the first ones, for continuing training on answers
    added since (``train_heads(init=...)``) without recomputing the features of those trained on.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if start % shard_size or start < 0:
        raise ValueError(f"start must be a non-negative multiple of shard_size={shard_size}, got {start}")
    if compute_dtype is None:
        from .distill import native_bf16

        slow_bf16 = dtype == torch.bfloat16 and not torch.cuda.is_available() and not native_bf16()
        compute_dtype = torch.float32 if slow_bf16 else dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [r for r in read_records(data_file) if r["output_token_ids"]][:limit]
    # Shards depend only on these keys (not on the record count): a run with a different --limit
    # reuses every shard whose records match.
    meta_file = out / "meta.json"
    meta = {"model": str(model_path), "data_file": str(data_file), "shard_size": shard_size,
            "dtype": str(dtype).removeprefix("torch."), "labels": labels,
            "compute_dtype": str(compute_dtype).removeprefix("torch.")}
    if meta_file.is_file() and {k: json.loads(meta_file.read_text()).get(k) for k in meta} != meta:
        for f in out.glob("shard-*.pt"):
            f.unlink()
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    n_shards = (len(records) + shard_size - 1) // shard_size
    first_shard = start // shard_size
    if first_shard >= n_shards:
        raise ValueError(f"start={start}: {data_file} has only {len(records)} answers")
    for s in range(first_shard, n_shards):
        shard_file = out / f"shard-{s:05d}.pt"
        want = [r["id"] for r in records[s * shard_size:(s + 1) * shard_size]]
        if shard_file.is_file() and torch.load(shard_file, weights_only=True)["ids"] != want:
            shard_file.unlink()
    decoder, model = load_backbone(model_path, compute_dtype)
    lm_head = model.get_output_embeddings().weight.detach()
    meta.update(hidden_size=int(lm_head.shape[1]), vocab_size=int(lm_head.shape[0]), num_shards=n_shards,
                first_shard=first_shard, num_records=len(records) - start)
    torch.save(lm_head.to(dtype).clone(), out / "lm_head.pt")
    torch.save(model.get_input_embeddings().weight.detach().to(dtype).clone(), out / "embed_tokens.pt")
    total = sum(_seq_len(r) for r in records[start:])
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for s in range(first_shard, n_shards):
        chunk = records[s * shard_size:(s + 1) * shard_size]
        shard_file = out / f"shard-{s:05d}.pt"
        if not shard_file.is_file():
            hidden = torch.cat(hidden_states_for(decoder, chunk, max_batch_tokens))
            tokens = (model_labels(hidden, lm_head) if labels == "model" else
                      torch.tensor([t for r in chunk for t in r["output_token_ids"]], dtype=torch.int32))
            shard = {"ids": [r["id"] for r in chunk],
                     "lengths": torch.tensor([len(r["output_token_ids"]) for r in chunk]),
                     "hidden": hidden.to(dtype), "tokens": tokens}
            tmp = shard_file.with_suffix(".tmp")
            torch.save(shard, tmp)
            os.replace(tmp, shard_file)
        bar.update(sum(_seq_len(r) for r in chunk))
    bar.close()
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return out


@dataclass
class Features:
    """All cached positions of a features directory, concatenated."""

    hidden: torch.Tensor     # [N, H]
    tokens: torch.Tensor     # [N] answer token at each position (base lm_head target)
    lengths: torch.Tensor    # [R] answer length of each record
    ids: list[str]
    lm_head: torch.Tensor    # [V, H]
    meta: dict[str, Any]
    embed_tokens: torch.Tensor | None = None  # [V, H] input embedding (older caches lack it)

    def token_embeds(self, rows: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Input embeddings of the tokens produced at ``rows`` (what token-conditioned heads see),
        ``[N, H]``; with ``num_heads``, ``[K, N, H]`` of the token produced at row + k, the one
        before head k's target (what path-conditioned heads see; past an answer's end the target
        is IGNORE, so what is read there does not matter)."""
        if self.embed_tokens is None:
            raise ValueError(f"features from {self.meta.get('model')} have no embed_tokens.pt (cached "
                             "before token-conditioned heads): rerun the features stage, which keeps "
                             "the shards and adds it")
        if num_heads is None:
            return self.embed_tokens[self.tokens[rows].long()]
        return self.embed_tokens[path_tokens(self.tokens, num_heads, rows).long()]

    @property
    def record_starts(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths

    def targets(self, num_heads: int) -> torch.Tensor:
        """``[N, K]``: head k at row j of a record predicts answer token j+1+k (IGNORE past the end)."""
        n = self.tokens.numel()
        rec = torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)
        end = (self.record_starts + self.lengths)[rec]
        out = torch.full((n, num_heads), IGNORE, dtype=torch.long)
        for k in range(num_heads):
            src = torch.arange(n) + 1 + k
            ok = src < end
            out[ok, k] = self.tokens[src[ok]].long()
        return out

    def prefix(self, num_records: int) -> "Features":
        """The first ``num_records`` records (a learning curve's smaller training sets)."""
        return self.slice(0, num_records)

    def slice(self, start: int, stop: int) -> "Features":
        """Records ``start`` to ``stop`` (training continued on the answers added since ``start``)."""
        first, last = int(self.lengths[:start].sum()), int(self.lengths[:stop].sum())
        return Features(hidden=self.hidden[first:last], tokens=self.tokens[first:last],
                        lengths=self.lengths[start:stop], ids=self.ids[start:stop], lm_head=self.lm_head,
                        meta=self.meta, embed_tokens=self.embed_tokens)

    def record_rows(self, record_indices: torch.Tensor) -> torch.Tensor:
        """Row indices of the given records."""
        starts, lengths = self.record_starts[record_indices], self.lengths[record_indices]
        if len(lengths) == 0:
            return torch.zeros(0, dtype=torch.long)
        rec = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        offsets = torch.arange(int(lengths.sum())) - (torch.cumsum(lengths, 0) - lengths)[rec]
        return starts[rec] + offsets


def load_features(features_dir: str | os.PathLike) -> Features:
    """Concatenate the shards of a features directory (from ``first_shard`` on, see ``start``)."""
    d = Path(features_dir)
    meta = json.loads((d / "meta.json").read_text())
    if "num_shards" not in meta:
        raise ValueError(f"{d}: feature extraction did not finish (rerun the features stage)")
    shards = [torch.load(d / f"shard-{s:05d}.pt", weights_only=True)
              for s in range(meta.get("first_shard", 0), meta["num_shards"])]
    if not shards:
        raise ValueError(f"{d}: no feature shards")
    return Features(hidden=torch.cat([s["hidden"] for s in shards]),
                    tokens=torch.cat([s["tokens"] for s in shards]),
                    lengths=torch.cat([s["lengths"] for s in shards]),
                    ids=[i for s in shards for i in s["ids"]],
                    lm_head=torch.load(d / "lm_head.pt", weights_only=True),
                    meta=meta,
                    embed_tokens=(torch.load(d / "embed_tokens.pt", weights_only=True)
                                  if (d / "embed_tokens.pt").is_file() else None))
