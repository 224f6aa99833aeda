"""Reading Medusa head checkpoints in every known layout, validated loudly against the base model.

Layouts: FasterDecoding Medusa-1 (``medusa_lm_head.pt`` / ``.safetensors``, own or shared vocab
projection), "v2"/TGI heads sharing the base ``lm_head``, vLLM ``MedusaModel`` (``model.safetensors``,
``token_map``) and Medusa-2 bundles (``medusa_head.*`` keys beside the backbone, possibly sharded).
Every problem raises ``MedusaHeadsError`` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vllm_medusa.heads import MedusaHeads

logger = logging.getLogger(__name__)

FASTERDECODING_WEIGHTS = "medusa_lm_head.safetensors"
FASTERDECODING_PICKLE = "medusa_lm_head.pt"
VLLM_WEIGHTS = "model.safetensors"

# Prefixes under which bundled (Medusa-2) or wrapped checkpoints store the heads.
_HEAD_PREFIXES = ("model.medusa_head.", "medusa_head.", "medusa_heads.", "base_model.medusa_head.")

_FD_BLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_FD_PROJ = re.compile(r"^(\d+)\.(\d+)\.(weight|bias)$")
_VLLM_BLOCK = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_VLLM_PROJ = re.compile(r"^lm_heads\.(\d+)\.(weight|bias)$")
_FD_TOKEN = re.compile(r"^(\d+)\.token\.weight$")
_SINGLE_PROJ = re.compile(r"^(?:lm_head|original_lm_head)(?:\.(weight|bias))?$")


class MedusaHeadsError(ValueError):
    """A Medusa checkpoint that cannot be used with this base model; the message names the file."""



def _fail(source: Path | str, problem: str) -> MedusaHeadsError:
    return MedusaHeadsError(f"Medusa heads {source}: {problem}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read config: {e}") from e
    if not isinstance(data, dict):
        raise _fail(path, "config is not a JSON object")
    return data


def _load_tensor_file(path: Path, keep: Any = None) -> dict[str, Tensor]:
    """All tensors of one file (``keep(name)`` filters safetensors keys before they are read)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if keep is None or keep(name):
                        out[name] = f.get_tensor(name)
            return out
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except MedusaHeadsError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser error means the same thing to the user
        raise _fail(path, f"not a readable weights file ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise _fail(path, "the pickle does not hold a state dict of tensors")
    return {str(k): v for k, v in obj.items() if keep is None or keep(str(k))}


def _has_head_prefix(name: str) -> bool:
    return name.startswith(_HEAD_PREFIXES)


def _strip_head_prefix(name: str) -> str:
    for prefix in _HEAD_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _sharded_head_tensors(index_path: Path) -> dict[str, Tensor]:
    """Medusa-2 bundles: read only the shards (and keys) that hold ``medusa_head.*``."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _fail(index_path, "index has no weight_map")
    shards = sorted({f for k, f in weight_map.items() if _has_head_prefix(k)})
    if not shards:
        raise _fail(index_path, "no medusa_head.* weights in this checkpoint")
    out: dict[str, Tensor] = {}
    for shard in shards:
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise _fail(index_path, f"shard {shard} is listed in the index but missing")
        out.update(_load_tensor_file(shard_path, _has_head_prefix))
    return out


def _locate(path: Path) -> tuple[Path, dict[str, Tensor], dict[str, Any]]:
    """Find the weights (file, tensors) and the config next to them."""
    if not path.exists():
        raise _fail(path, "no such file or directory")
    if path.is_dir():
        candidates = [path / FASTERDECODING_WEIGHTS, path / FASTERDECODING_PICKLE, path / VLLM_WEIGHTS,
                      path / "model.safetensors.index.json", path / "pytorch_model.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            shards = sorted(path.glob("*.safetensors"))
            if len(shards) == 1:
                found = shards[0]
            elif not shards:
                raise _fail(path, f"no weights found (looked for {FASTERDECODING_WEIGHTS}, "
                                  f"{FASTERDECODING_PICKLE}, {VLLM_WEIGHTS}, sharded safetensors)")
            else:
                tensors: dict[str, Tensor] = {}
                for shard in shards:
                    tensors.update(_load_tensor_file(shard, _has_head_prefix))
                if not tensors:
                    raise _fail(path, "no medusa_head.* weights in any safetensors shard")
                return path, tensors, _dir_config(path)
        weights_file, config_dir = found, path
    else:
        weights_file, config_dir = path, path.parent
    if weights_file.name.endswith(".index.json"):
        tensors = _sharded_head_tensors(weights_file)
    else:
        tensors = _load_tensor_file(weights_file)
    return weights_file, tensors, _dir_config(config_dir)


def _dir_config(directory: Path) -> dict[str, Any]:
    cfg = directory / "config.json"
    return _read_json(cfg) if cfg.is_file() else {}


def _parse_keys(source: Path, tensors: dict[str, Tensor], config: Mapping[str, Any]):
    """Sort tensors into blocks / projections / token_map whatever the naming scheme."""
    if any(_has_head_prefix(k) for k in tensors):
        tensors = {_strip_head_prefix(k): v for k, v in tensors.items() if _has_head_prefix(k)}
    blocks: dict[tuple[int, int, str], Tensor] = {}
    fd_proj: dict[tuple[int, int, str], Tensor] = {}
    projs: dict[tuple[int, str], Tensor] = {}
    single: dict[str, Tensor] = {}
    token_weights: dict[int, Tensor] = {}
    token_map = None
    unexpected = []
    for name, t in tensors.items():
        if m := (_FD_BLOCK.match(name) or _VLLM_BLOCK.match(name)):
            blocks[(int(m[1]), int(m[2]), m[3])] = t
        elif m := _FD_PROJ.match(name):
            fd_proj[(int(m[1]), int(m[2]), m[3])] = t
        elif m := _VLLM_PROJ.match(name):
            projs[(int(m[1]), m[2])] = t
        elif m := _FD_TOKEN.match(name):
            token_weights[int(m[1])] = t
        elif m := _SINGLE_PROJ.match(name):
            single[m[1] or "weight"] = t
        elif name == "token_map":
            token_map = t
        else:
            unexpected.append(name)
    if unexpected:
        raise _fail(source, f"unexpected keys {sorted(unexpected)[:8]}"
                            f"{' ...' if len(unexpected) > 8 else ''} (not a Medusa heads checkpoint?)")
    if not blocks and not fd_proj and not projs and not single:
        raise _fail(source, "no Medusa head weights found")

    heads = sorted({h for h, _, _ in blocks} | {h for h, _, _ in fd_proj} | {h for h, _ in projs})
    num_heads = len(heads)
    if heads != list(range(num_heads)):
        raise _fail(source, f"head indices are not contiguous from 0: {heads}")
    layers_per_head = {h: sorted({layer for hh, layer, _ in blocks if hh == h}) for h in heads}
    num_layers = len(layers_per_head[0]) if heads else 0
    for h, layers in layers_per_head.items():
        if layers != list(range(num_layers)):
            raise _fail(source, f"inconsistent layer counts: head 0 has {num_layers} residual blocks, "
                                f"head {h} has layers {layers}")
    for h in heads:
        for layer in range(num_layers):
            if (h, layer, "weight") not in blocks:
                raise _fail(source, f"missing key for head {h} block {layer}: weight")
    with_bias = {(h, layer) for h, layer, kind in blocks if kind == "bias"}
    if with_bias and len(with_bias) != num_heads * num_layers:
        raise _fail(source, f"missing keys: only {len(with_bias)} of {num_heads * num_layers} "
                            "residual blocks have a bias")
    if with_bias and config.get("model_type") == "medusa" and not config.get("medusa_fc_bias", False):
        logger.warning("%s: blocks carry biases but config has no medusa_fc_bias=true; using the biases "
                       "(upstream vLLM would silently drop them)", source)

    # FasterDecoding projections sit at index L ({h}.{L}.weight); vLLM uses lm_heads.{h}.weight.
    for (h, idx, kind), t in fd_proj.items():
        if idx != num_layers:
            raise _fail(source, f"key {h}.{idx}.{kind}: expected the vocab projection at index "
                                f"{num_layers} (after {num_layers} residual blocks)")
        projs[(h, kind)] = t
    original_lm_head = bool(config.get("original_lm_head", False))
    if original_lm_head and projs and not single:
        if "weight" not in {k for h, k in projs if h == 0}:
            raise _fail(source, "original_lm_head is set but lm_heads.0.weight is missing")
        single = {kind: t for (h, kind), t in projs.items() if h == 0}
        projs = {}
    if single and projs:
        raise _fail(source, "both a single shared projection (lm_head) and per-head lm_heads.* present")
    if single and "weight" not in single:
        raise _fail(source, "missing key lm_head.weight")
    if projs:
        missing = [h for h in heads if (h, "weight") not in projs]
        if missing:
            raise _fail(source, f"missing vocab projection weights for heads {missing} "
                                f"(have them for {sorted(h for h, k in projs if k == 'weight')})")
        with_pbias = [h for h in heads if (h, "bias") in projs]
        if with_pbias and len(with_pbias) != num_heads:
            raise _fail(source, f"missing keys: only heads {with_pbias} have a projection bias")
    if token_weights and sorted(token_weights) != heads:
        raise _fail(source, f"token-conditioned heads: token weights for heads {sorted(token_weights)}, "
                            f"but the checkpoint has heads {heads}")
    if config.get("token_conditioning", "bonus") not in ("bonus", "path"):
        raise _fail(source, f"token_conditioning must be 'bonus' or 'path', got "
                            f"{config.get('token_conditioning')!r}")
    claim = ("token_conditioned" if config.get("token_conditioned") else
             "token_conditioning 'path'" if config.get("token_conditioning") == "path" else None)
    if claim and not token_weights:
        raise _fail(source, f"config says {claim} but there are no {{h}}.token.weight tensors")
    if token_weights and num_layers < 1:
        raise _fail(source, "token-conditioned heads need at least one residual block")
    return num_heads, num_layers, blocks, projs, single, token_map, token_weights


def _check_finite(source: Path, name: str, t: Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise _fail(source, f"{name} has {bad} non-finite values (NaN/inf): corrupt or diverged training")


def checkpoint_num_heads(path: str | os.PathLike) -> int:
    """Head count from the tensors alone (no base-model checks), to size a default tree."""
    source, tensors, config = _locate(Path(path))
    return _parse_keys(source, tensors, config)[0]


def load_medusa_heads(path: str | os.PathLike, *, hidden_size: int, vocab_size: int,
                      dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str = "cpu") -> MedusaHeads:
    """Load Medusa heads in any known layout and check them against the base model.

    ``path`` is a directory or a weights file: FasterDecoding Medusa-1 (``medusa_lm_head.pt`` or
    ``.safetensors``, own or shared projection), vLLM ``MedusaModel`` (``model.safetensors``), or a
    Medusa-2 bundle (``medusa_head.*`` keys beside the backbone, possibly sharded). Head and layer
    counts come from the tensors, because published configs disagree with their own weights.
    """
    from vllm_medusa.heads import MedusaHeads  # here, not at the top: heads.py re-exports this module

    path = Path(path)
    source, tensors, config = _locate(path)
    num_heads, num_layers, blocks, projs, single, token_map, token_weights = _parse_keys(
        source, tensors, config)

    # Hidden size: every block is [H, H] and must match the base model.
    token_items = [((h, "token", "weight"), t) for h, t in sorted(token_weights.items())]
    for (h, layer, kind), t in sorted(blocks.items()) + token_items:
        _check_finite(source, f"head {h} block {layer} {kind}", t)
        want = (hidden_size, hidden_size) if kind == "weight" else (hidden_size,)
        if tuple(t.shape) != want:
            got = t.shape[-1] if t.dim() else 0
            if t.dim() in (1, 2) and all(s == got for s in t.shape):
                raise _fail(source, f"heads were trained for hidden size {got} but the base model has "
                                    f"{hidden_size}")
            raise _fail(source, f"head {h} block {layer} {kind} has shape {tuple(t.shape)}, "
                                f"expected {want}")

    if token_map is not None:
        token_map = token_map.to(torch.long).flatten()
        if token_map.numel() == 0 or int(token_map.min()) < 0 or int(token_map.max()) >= vocab_size:
            raise _fail(source, f"token_map holds ids outside the base vocabulary of {vocab_size}")
        if token_map.unique().numel() != token_map.numel():
            raise _fail(source, "token_map has duplicate token ids")
        # vLLM uses the map only when the config truncates the vocabulary; a projection that is
        # already as narrow as the map needs it whatever the config says.
        truncated = config.get("truncated_vocab_size")
        rows = {t.shape[0] for t in list(single.values()) + list(projs.values())}
        narrow = rows == {token_map.numel()} and token_map.numel() != vocab_size
        if not narrow and (truncated is None or int(truncated) >= vocab_size):
            token_map = None
        elif truncated is not None and int(truncated) != token_map.numel():
            raise _fail(source, f"config truncated_vocab_size={truncated} but token_map has "
                                f"{token_map.numel()} entries")
    out_vocab = vocab_size if token_map is None else token_map.numel()

    proj_tensors = ([single[k] for k in ("weight", "bias") if k in single] if single
                    else [projs[(h, k)] for h in range(num_heads) for k in ("weight", "bias")
                          if (h, k) in projs])
    for t in proj_tensors:
        if t.dim() == 2 and t.shape[1] != hidden_size:
            raise _fail(source, f"heads were trained for hidden size {t.shape[1]} but the base model "
                                f"has {hidden_size}")
        rows = t.shape[0]
        if token_map is not None and rows == vocab_size:
            continue  # full-vocab projection with a token map: sliced below, as vLLM does
        if rows != out_vocab:
            what = f"the token_map has {out_vocab} entries" if token_map is not None else \
                f"the base model has {vocab_size}"
            raise _fail(source, f"heads were trained for vocab size {rows} but {what}")
        if t.dim() not in (1, 2):
            raise _fail(source, f"projection tensor has shape {tuple(t.shape)}")

    shared = not projs and not single
    cfg_vocab = config.get("vocab_size")
    if shared and cfg_vocab is not None and int(cfg_vocab) != vocab_size:
        raise _fail(source, f"heads were trained for vocab size {cfg_vocab} but the base model has "
                            f"{vocab_size}")
    cfg_hidden = config.get("hidden_size")
    if cfg_hidden is not None and int(cfg_hidden) != hidden_size:
        raise _fail(source, f"heads were trained for hidden size {cfg_hidden} but the base model has "
                            f"{hidden_size}")
    for key in ("medusa_num_heads", "num_heads"):
        if key in config and int(config[key]) != num_heads:
            logger.warning("%s: config says %s=%s but the weights hold %d heads; using %d",
                           source, key, config[key], num_heads, num_heads)

    has_block_bias = any(kind == "bias" for _, _, kind in blocks)
    proj_has_bias = ("bias" in single) if single else any(k == "bias" for _, k in projs)
    heads = MedusaHeads(num_heads, num_layers, hidden_size, vocab_size, shared_lm_head=shared,
                        block_bias=has_block_bias, proj_bias=proj_has_bias,
                        num_projections=1 if single else None, token_map=token_map,
                        token_conditioned=bool(token_weights),
                        path_conditioned=config.get("token_conditioning") == "path", dtype=dtype, device=device)

    def fit(t: Tensor) -> Tensor:
        if token_map is not None and t.shape[0] == vocab_size and out_vocab != vocab_size:
            t = t[token_map]
        return t

    with torch.no_grad():
        for (h, layer, kind), t in blocks.items():
            target = heads.block_weight if kind == "weight" else heads.block_bias
            target[h, layer].copy_(t)
        for h, t in token_weights.items():
            heads.token_weight[h].copy_(t)
        if single:
            heads.proj_weight[0].copy_(fit(single["weight"]))
            if "bias" in single:
                heads.proj_bias[0].copy_(fit(single["bias"]))
        elif projs:
            for (h, kind), t in projs.items():
                _check_finite(source, f"head {h} projection {kind}", t)
                (heads.proj_weight if kind == "weight" else heads.proj_bias)[h].copy_(fit(t))
        for kind, t in single.items():
            _check_finite(source, f"shared projection {kind}", t)
    heads.source = str(source)
    heads.eval()
    return heads
