"""Writing Medusa heads: the FasterDecoding layout this project saves, and vLLM 0.32's MedusaModel layout.

``save_medusa_heads`` writes what training produces (``config.json`` + ``medusa_lm_head.safetensors``);
``convert_to_vllm_medusa`` rewrites any readable checkpoint so upstream chain Medusa can load it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from vllm_medusa.head_checkpoints import (
    FASTERDECODING_WEIGHTS,
    VLLM_WEIGHTS,
    _dir_config,
    _fail,
    load_medusa_heads,
)

if TYPE_CHECKING:
    from vllm_medusa.heads import MedusaHeads

logger = logging.getLogger(__name__)


def _save_safetensors(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    path.chmod(0o644)  # the writer creates owner-only files; heads are meant to be shared


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_medusa_heads(heads: MedusaHeads, out_dir: str | os.PathLike,
                      base_model_name_or_path: str, *, dtype: torch.dtype | None = None,
                      extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write the FasterDecoding layout: ``config.json`` + ``medusa_lm_head.safetensors``.

    With a shared lm_head only the residual blocks are written (a few MB); readers must take the
    vocab projection from the base model (``shared_lm_head: true`` in the config).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or heads.block_weight.dtype
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in heads.fasterdecoding_state_dict().items()}
    config: dict[str, Any] = {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        "base_model_name_or_path": str(base_model_name_or_path),
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "shared_lm_head": heads.shared_lm_head,
        "torch_dtype": _dtype_name(dtype),
    }
    if heads.token_map is not None:
        config["truncated_vocab_size"] = heads.out_vocab_size
    if heads.token_conditioned:
        config["token_conditioned"] = True
        config["token_conditioning"] = "path" if heads.path_conditioned else "bonus"
    if extra_config:
        config.update(extra_config)
    _save_safetensors(sd, out / FASTERDECODING_WEIGHTS, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _infer_sizes(heads_dir: Path, lm_head_weight: Tensor | None) -> tuple[int, int]:
    if lm_head_weight is not None:
        return int(lm_head_weight.shape[1]), int(lm_head_weight.shape[0])
    config = _dir_config(heads_dir) if heads_dir.is_dir() else _dir_config(heads_dir.parent)
    if "hidden_size" in config and "vocab_size" in config:
        return int(config["hidden_size"]), int(config["vocab_size"])
    raise _fail(heads_dir, "pass lm_head_weight: the config does not give hidden_size and vocab_size")


def convert_to_vllm_medusa(heads_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           lm_head_weight: Tensor | None, *,
                           dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write vLLM 0.32's ``MedusaModel`` layout so upstream chain Medusa can load the heads.

    Upstream has no shared-lm_head mode, so a shared projection is materialised into every head's
    ``lm_heads.{h}.weight``, over the full vocabulary even for heads with a draft vocabulary. Blocks
    keep their biases (``medusa_fc_bias: true``); upstream's ``MedusaConfig`` maps any config key
    containing "num"+"heads"/"layers", so no other such key is written.
    """
    heads_dir = Path(heads_dir)
    hidden, vocab = _infer_sizes(heads_dir, lm_head_weight)
    heads = load_medusa_heads(heads_dir, hidden_size=hidden, vocab_size=vocab, dtype=dtype)
    if heads.token_conditioned:
        raise _fail(heads_dir, "token-conditioned heads cannot run as vLLM 0.32's MedusaModel (its "
                               "heads see the hidden state only); use method medusa_tree")
    if heads.shared_lm_head and lm_head_weight is None:
        raise _fail(heads_dir, "the heads share the base lm_head: pass lm_head_weight to materialise it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd: dict[str, Tensor] = {}
    for h in range(heads.num_heads):
        for layer in range(heads.num_layers):
            sd[f"blocks.{h}.layers.{layer}.weight"] = heads.block_weight[h, layer].to(dtype)
            sd[f"blocks.{h}.layers.{layer}.bias"] = (
                heads.block_bias[h, layer] if heads.block_bias is not None
                else torch.zeros(heads.hidden_size)).to(dtype)
    if heads.token_map is not None and heads.shared_lm_head:
        # vLLM 0.32's MedusaModel cannot load a token_map (its load_weights does not report the
        # parameter it creates, and the loader then fails), so upstream gets the full vocabulary.
        heads.token_map = None
    elif heads.token_map is not None:
        raise _fail(heads_dir, "vLLM 0.32's MedusaModel cannot load a reduced vocabulary (token_map), "
                               "and these heads have their own reduced projections")
    proj = heads.projection_per_head(None if lm_head_weight is None else lm_head_weight.detach())
    for h in range(heads.num_heads):
        sd[f"lm_heads.{h}.weight"] = proj[h].to(dtype).clone()
    if heads.proj_bias is not None:
        logger.warning("%s: projection biases are dropped: vLLM's MedusaModel lm_heads have no bias",
                       heads_dir)
    config: dict[str, Any] = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "num_heads": heads.num_heads,
        "num_hidden_layers": heads.num_layers,
        "truncated_vocab_size": heads.out_vocab_size,
        "medusa_fc_bias": True,
        "max_paths": 64,
        "topk": 10,
        "torch_dtype": _dtype_name(dtype),
    }
    _save_safetensors(sd, out / VLLM_WEIGHTS, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out

