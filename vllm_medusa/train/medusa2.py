"""Medusa-2: train the heads and the backbone together (LoRA), then merge and save one checkpoint.

Medusa-1 heads guess what a frozen backbone will say; Medusa-2 (Cai et al. 2024, section 2.3.2)
also lets the backbone move towards hidden states the heads can read, while a distillation loss
keeps its own next-token distribution on the original's: ``KL(original || tuned)`` on the
self-distilled answers, plus ``heads_weight * sum_k head_decay**k * CE_k`` of the heads. The
backbone learns through LoRA adapters at a lower learning rate than the heads (two parameter
groups); the original's logits come from the same model with the adapters disabled, so no second
copy is held. The heads start from a Medusa-1 warm-up (otherwise their large early gradients would
pull the backbone off its distribution). At the end the adapters are merged into the weights.

The output folder is both a Hugging Face checkpoint (``model.safetensors`` with an index naming
only the backbone's weights, so vLLM and transformers load it as a plain model) and a heads folder
(``medusa_lm_head.safetensors`` plus the heads' keys in ``config.json``), so
``LLM(model=DIR, speculative_config={"method": "medusa_tree", "model": DIR})`` serves it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..head_checkpoints import FASTERDECODING_WEIGHTS
from ..heads import MedusaHeads, load_medusa_heads, path_tokens, save_medusa_heads
from .distill import read_records
from .features import IGNORE, load_backbone, pad_batch
from .trainer import _lr_at, medusa_loss

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"
INDEX_FILE = "model.safetensors.index.json"
# Files of a HF model folder that are not weights or the config: copied from the base model.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


@dataclass
class Medusa2Config:
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lr_heads: float = 1e-3
    # Lower than the heads': the backbone only has to make room for the heads, not learn anew.
    lr_backbone: float = 1e-4
    heads_weight: float = 0.2
    head_decay: float = 0.8
    epochs: float = 1.0
    batch_tokens: int = 2048       # prompt + answer tokens per step (padded)
    warmup_fraction: float = 0.05
    checkpoint_every: int = 50     # steps
    seed: int = 0
    # float32 by default: rounding W + BA to bf16 would drop LoRA updates below W's rounding step.
    save_dtype: str = "float32"


@dataclass
class Medusa2Result:
    steps: int
    records: int
    answer_tokens: int
    seconds: float
    resumed_at: int
    final_kl: float
    final_heads_loss: float
    final_head0_top1: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def kl_to_original(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(teacher || student)`` for ``[N, V]`` logits, in float32."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def lora_model(model: Any, cfg: Medusa2Config) -> Any:
    """``model`` wrapped with LoRA adapters (B = 0, so it starts as the original) on ``cfg.lora_targets``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise SystemExit("the medusa-2 recipe needs peft: pip install 'vllm-medusa[train]'") from e
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {list(cfg.lora_targets)} exist in "
                         f"{type(model).__name__}; pass target names this architecture has")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, bias="none")
    return get_peft_model(model, lora)


def answer_rows(records: Sequence[dict[str, Any]], width: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Flat indices into ``[B * width]`` of the positions that predict answer tokens (P-1 .. P+m-2),
    and each record's answer tokens, in the same order."""
    rows, answers = [], []
    for r, rec in enumerate(records):
        p, m = len(rec["prompt_token_ids"]), len(rec["output_token_ids"])
        rows.append(torch.arange(p - 1, p - 1 + m) + r * width)
        answers.append(list(rec["output_token_ids"]))
    return torch.cat(rows), answers


def head_targets(answers: Sequence[Sequence[int]], num_heads: int) -> torch.Tensor:
    """``[N, K]``: head k at answer row j predicts answer token j+1+k (IGNORE past the end)."""
    out = []
    for a in answers:
        t = torch.full((len(a), num_heads), IGNORE, dtype=torch.long)
        a_t = torch.tensor(a, dtype=torch.long)
        for k in range(num_heads):
            if len(a) > 1 + k:
                t[:len(a) - 1 - k, k] = a_t[1 + k:]
        out.append(t)
    return torch.cat(out)


def batches(records: Sequence[dict[str, Any]], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Records grouped into padded batches of at most ``batch_tokens``, in a per-epoch shuffled
    order that depends only on (seed, epoch), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(records), generator=g).tolist()
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = len(records[i]["prompt_token_ids"]) + len(records[i]["output_token_ids"])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def _remap(targets: torch.Tensor, token_map: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Targets as indices into the heads' logits (token_map order); tokens outside it -> IGNORE."""
    if token_map is None:
        return targets
    remap = torch.full((vocab + 1,), IGNORE, dtype=torch.long)
    remap[token_map] = torch.arange(len(token_map))
    return remap[targets.clamp(min=-1)]


def joint_losses(model: Any, heads: MedusaHeads, records: Sequence[dict[str, Any]],
                 cfg: Medusa2Config) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(KL to the original, heads loss, per-head top-1) of one batch through the LoRA model."""
    ids, mask = pad_batch([r["prompt_token_ids"] + r["output_token_ids"] for r in records])
    rows, answers = answer_rows(records, ids.shape[1])
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings().weight
    with torch.no_grad(), model.disable_adapter():
        teacher = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[rows]
        teacher_logits = teacher @ lm_head.T
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[rows]
    kl = kl_to_original(hidden @ lm_head.T, teacher_logits)
    tokens = torch.tensor([t for a in answers for t in a], dtype=torch.long)
    if heads.path_conditioned:
        tokens = path_tokens(tokens, heads.num_heads)
    embeds = model.get_input_embeddings().weight[tokens].detach() if heads.token_conditioned else None
    targets = _remap(head_targets(answers, heads.num_heads), heads.token_map, heads.vocab_size)
    logits = heads(hidden, lm_head.detach(), token_embeds=embeds)
    head_loss, accs = medusa_loss(logits, targets, cfg.head_decay)
    return kl, head_loss, accs


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _save_checkpoint(path: Path, step: int, model: Any, heads: MedusaHeads, opt: Any,
                     history: list[dict[str, float]], fingerprint: dict[str, Any]) -> None:
    from peft import get_peft_model_state_dict

    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "lora": get_peft_model_state_dict(model), "heads": heads.state_dict(),
                "optimizer": opt.state_dict(), "history": history, "fingerprint": fingerprint}, tmp)
    os.replace(tmp, path)


def train_medusa2(model_path: str | os.PathLike, records: Sequence[dict[str, Any]],
                  warmup_heads: str | os.PathLike, work_dir: str | os.PathLike,
                  cfg: Medusa2Config | None = None, *, max_steps: int | None = None,
                  progress: bool = True) -> tuple[Any, MedusaHeads, Medusa2Result]:
    """Joint training; returns (LoRA model, heads, result). Resumes from ``work_dir/checkpoint.pt``
    when it was written for the same model, data, warm-up heads and settings."""
    from peft import set_peft_model_state_dict

    cfg = cfg or Medusa2Config()
    records = [r for r in records if r["output_token_ids"]]
    if not records:
        raise ValueError("medusa-2: no self-distilled answers to train on (run the distill stage)")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    _, base = load_backbone(model_path, torch.float32)
    model = lora_model(base, cfg)
    vocab, hidden_size = base.get_output_embeddings().weight.shape
    heads = load_medusa_heads(warmup_heads, hidden_size=hidden_size, vocab_size=vocab, dtype=torch.float32)
    heads.requires_grad_(True)
    heads.train()
    opt = torch.optim.AdamW([{"params": _trainable(model), "lr": cfg.lr_backbone, "base": cfg.lr_backbone},
                             {"params": [p for p in heads.parameters() if p.requires_grad],
                              "lr": cfg.lr_heads, "base": cfg.lr_heads}], weight_decay=0.0)

    per_epoch = len(batches(records, cfg.batch_tokens, cfg.seed, 0))
    total = max(1, round(per_epoch * cfg.epochs))
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = max(1, round(total * cfg.warmup_fraction))
    fingerprint = {"model": str(model_path), "records": [r["id"] for r in records][:50] + [len(records)],
                   "warmup_heads": str(warmup_heads), "config": asdict(cfg), "total": total}
    ckpt_file = work / CHECKPOINT
    step, history = 0, []
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, weights_only=False)
        if json.loads(json.dumps(ckpt["fingerprint"])) != json.loads(json.dumps(fingerprint)):
            raise SystemExit(f"{ckpt_file} was written for other data or settings; delete it (or use "
                             "another --work-dir) to start the joint phase over")
        set_peft_model_state_dict(model, ckpt["lora"])
        heads.load_state_dict(ckpt["heads"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
    resumed_at = step
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc="medusa-2", unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 30, disable=not progress)
    model.train()
    answer_tokens = sum(len(r["output_token_ids"]) for r in records)
    for batch in _steps(records, cfg, per_epoch, start=step, total=total):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, warmup, group["base"])
        kl, head_loss, accs = joint_losses(model, heads, [records[i] for i in batch], cfg)
        loss = kl + cfg.heads_weight * head_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        history.append({"kl": float(kl.detach()), "heads": float(head_loss.detach()), "top1": accs[0]})
        bar.update(1)
        bar.set_postfix(kl=f"{history[-1]['kl']:.4f}", heads=f"{history[-1]['heads']:.2f}", top1=f"{accs[0]:.2f}")
        if step % cfg.checkpoint_every == 0 or step == total:
            _save_checkpoint(ckpt_file, step, model, heads, opt, history, fingerprint)
    bar.close()
    model.eval()
    heads.eval()
    tail = history[-min(20, len(history)):] or [{"kl": float("nan"), "heads": float("nan"), "top1": float("nan")}]
    result = Medusa2Result(steps=step, records=len(records), answer_tokens=answer_tokens,
                           seconds=round(time.time() - t0, 1), resumed_at=resumed_at,
                           final_kl=sum(h["kl"] for h in tail) / len(tail),
                           final_heads_loss=sum(h["heads"] for h in tail) / len(tail),
                           final_head0_top1=sum(h["top1"] for h in tail) / len(tail), history=history)
    return model, heads, result


def _steps(records: Sequence[dict[str, Any]], cfg: Medusa2Config, per_epoch: int, *, start: int,
           total: int) -> Iterator[list[int]]:
    """Batches for steps ``start .. total-1`` (epoch e's order is fixed by the seed and e)."""
    step = start
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        for batch in batches(records, cfg.batch_tokens, cfg.seed, epoch)[offset:]:
            if step >= total:
                return
            yield batch
            step += 1


def save_medusa2(model: Any, heads: MedusaHeads, base_path: str | os.PathLike, out_dir: str | os.PathLike,
                 *, base_model_name_or_path: str, save_dtype: str = "float32") -> Path:
    """Merge the adapters and write the model (with an index naming only its own weights, so
    loaders skip the heads' file), the tokenizer files of the base, and the heads beside them."""
    from safetensors import safe_open

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload()
    merged.to(getattr(torch, save_dtype)).save_pretrained(out, safe_serialization=True)
    weights = sorted(out.glob("model*.safetensors"))
    if not (out / INDEX_FILE).is_file():
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        size = sum(w.stat().st_size for w in weights)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                  "weight_map": {k: "model.safetensors" for k in keys}},
                                                 indent=2) + "\n")
    for name in _TOKENIZER_FILES:
        if (Path(base_path) / name).is_file():
            shutil.copy2(Path(base_path) / name, out / name)
    heads_dir = out / ".heads-tmp"
    save_medusa_heads(heads, heads_dir, base_model_name_or_path, dtype=torch.float32)
    os.replace(heads_dir / FASTERDECODING_WEIGHTS, out / FASTERDECODING_WEIGHTS)
    head_config = json.loads((heads_dir / "config.json").read_text())
    shutil.rmtree(heads_dir)
    config = json.loads((out / "config.json").read_text())
    # The heads' loader reads config.json beside the weights: it needs the head count and the
    # draft vocabulary (truncated_vocab_size) there; the model's own keys are left as they are.
    for key in ("medusa_num_heads", "medusa_num_layers", "shared_lm_head", "truncated_vocab_size",
                "token_conditioned"):
        if key in head_config:
            config[key] = head_config[key]
    config["medusa_recipe"] = "medusa-2"
    config["medusa_base_model"] = str(base_model_name_or_path)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def run_medusa2(model_path: str | os.PathLike, data_file: str | os.PathLike, warmup_heads: str | os.PathLike,
                out_dir: str | os.PathLike, work_dir: str | os.PathLike, cfg: Medusa2Config | None = None,
                *, base_model_name_or_path: str, max_steps: int | None = None,
                limit: int | None = None) -> Medusa2Result:
    """Joint phase on the distilled answers of ``data_file`` (the first ``limit``), then save."""
    cfg = cfg or Medusa2Config()
    records = read_records(data_file)[:limit]
    model, heads, result = train_medusa2(model_path, records, warmup_heads, work_dir, cfg, max_steps=max_steps)
    out = save_medusa2(model, heads, model_path, out_dir, base_model_name_or_path=base_model_name_or_path,
                       save_dtype=cfg.save_dtype)
    (out / "medusa2.json").write_text(json.dumps({"training": result.summary(), "config": asdict(cfg)},
                                                 indent=2) + "\n")
    return result
