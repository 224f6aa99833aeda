"""Medusa heads: one module for every checkpoint layout, with loud validation.

Head k maps the base model's last hidden state at position t to logits for token t+2+k (the base
``lm_head`` gives t+1). A head is ``num_layers`` residual blocks ``x + SiLU(W x + b)`` followed by a
vocab projection: its own, one projection shared by all heads (vLLM ``original_lm_head``), or the
base model's ``lm_head`` passed in at call time (``shared_lm_head``, the "v2"/TGI style).

Token-conditioned heads (an extension, ``token_conditioned`` in the config) also see the input
embedding of the token the base model has just produced from that hidden state (the bonus token of
the step): the first block computes ``SiLU(W x + U e(token) + b)``. Plain Medusa heads guess t+2
without knowing t+1; given it, head 0's held-out top-1 on the demo model rises from 0.30 to 0.38
(Hydra and EAGLE feed drafted tokens back in the same way). The tree and verification are unchanged:
every request's token is known before its tree is drafted.

Weights are stacked across heads so a forward pass is one batched matmul per block layer and one
GEMM for the projection, instead of a Python loop over heads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class MedusaHeads(nn.Module):
    """K Medusa heads with weights stacked across heads.

    Parameters are ``block_weight [K, L, H, H]`` (``nn.Linear`` layout, out x in), optional
    ``block_bias [K, L, H]``, and unless ``shared_lm_head`` a projection ``proj_weight [P, V', H]``
    with P = K (one per head) or P = 1 (one for all heads), optional ``proj_bias [P, V']``.
    V' is ``vocab_size``, or ``len(token_map)`` when the heads predict over a reduced vocabulary.
    Token-conditioned heads have ``token_weight [K, H, H]`` (first block, applied to the embedding).
    """

    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int, *,
                 shared_lm_head: bool = True, block_bias: bool = True, proj_bias: bool = False,
                 num_projections: int | None = None, token_map: Tensor | None = None,
                 token_conditioned: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"need >= 1 head and >= 0 layers, got {num_heads} heads, {num_layers} layers")
        if token_conditioned and num_layers < 1:
            raise ValueError("token-conditioned heads need at least one residual block")
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.shared_lm_head = shared_lm_head
        kw = {"dtype": dtype, "device": device}
        self.block_weight = nn.Parameter(torch.zeros(num_heads, num_layers, hidden_size, hidden_size, **kw))
        self.block_bias = (nn.Parameter(torch.zeros(num_heads, num_layers, hidden_size, **kw))
                           if block_bias else None)
        self.token_weight = (nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size, **kw))
                             if token_conditioned else None)
        if token_map is not None:
            token_map = token_map.to(device=device, dtype=torch.long)
        self.register_buffer("token_map", token_map)
        out_vocab = vocab_size if token_map is None else int(token_map.numel())
        if shared_lm_head:
            self.proj_weight = None
            self.proj_bias = None
        else:
            p = num_heads if num_projections is None else num_projections
            if p not in (1, num_heads):
                raise ValueError(f"num_projections must be 1 or {num_heads}, got {p}")
            self.proj_weight = nn.Parameter(torch.empty(p, out_vocab, hidden_size, **kw))
            nn.init.normal_(self.proj_weight, std=hidden_size ** -0.5)
            self.proj_bias = nn.Parameter(torch.zeros(p, out_vocab, **kw)) if proj_bias else None

    @property
    def token_conditioned(self) -> bool:
        return self.token_weight is not None

    @property
    def out_vocab_size(self) -> int:
        """Width of the logits: the full vocabulary, or the reduced one under ``token_map``."""
        return self.vocab_size if self.token_map is None else int(self.token_map.numel())

    def extra_repr(self) -> str:
        kind = "shared base lm_head" if self.shared_lm_head else f"{self.proj_weight.shape[0]} projection(s)"
        tm = f", token_map={self.out_vocab_size}" if self.token_map is not None else ""
        tc = ", token-conditioned" if self.token_conditioned else ""
        return (f"heads={self.num_heads}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"vocab={self.vocab_size}, {kind}{tm}{tc}")

    def residual(self, hidden: Tensor, num_heads: int | None = None,
                 token_embeds: Tensor | None = None) -> Tensor:
        """The residual blocks of the first ``num_heads`` heads (default all): ``[B, H] -> [K, B, H]``.

        ``token_embeds [B, H]``: input embeddings of the tokens produced from ``hidden`` (needed by,
        and only by, token-conditioned heads).
        """
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be [B, {self.hidden_size}], got {tuple(hidden.shape)}")
        if self.token_conditioned != (token_embeds is not None):
            raise ValueError("these Medusa heads are token-conditioned: pass token_embeds"
                             if self.token_conditioned else
                             "token_embeds given, but these Medusa heads are not token-conditioned")
        if token_embeds is not None and tuple(token_embeds.shape) != tuple(hidden.shape):
            raise ValueError(f"token_embeds must be {tuple(hidden.shape)}, got {tuple(token_embeds.shape)}")
        k = self.num_heads if num_heads is None else num_heads
        x = hidden.to(self.block_weight.dtype).unsqueeze(0).expand(k, -1, -1)
        for layer in range(self.num_layers):
            w = self.block_weight[:k, layer].transpose(1, 2)
            if self.block_bias is not None:
                y = torch.baddbmm(self.block_bias[:k, layer].unsqueeze(1), x, w)
            else:
                y = torch.bmm(x, w)
            if layer == 0 and token_embeds is not None:
                e = token_embeds.to(x.dtype).unsqueeze(0).expand(k, -1, -1)
                y = torch.baddbmm(y, e, self.token_weight[:k].transpose(1, 2))
            x = x + F.silu(y)
        return x

    def _projection(self, lm_head_weight: Tensor | None) -> Tensor:
        if not self.shared_lm_head:
            return self.proj_weight
        if lm_head_weight is None:
            raise ValueError("these Medusa heads share the base model's lm_head: pass lm_head_weight")
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[-1] != self.hidden_size:
            raise ValueError(f"lm_head_weight must be [V, {self.hidden_size}], got {tuple(lm_head_weight.shape)}")
        w = lm_head_weight
        if self.token_map is not None and w.shape[0] > self.token_map.numel():
            w = w[self.token_map]
        return w.unsqueeze(0)

    def forward(self, hidden: Tensor, lm_head_weight: Tensor | None = None,
                num_heads: int | None = None, token_embeds: Tensor | None = None) -> Tensor:
        """Logits ``[K, B, V']`` of the first ``num_heads`` heads (default all) for ``[B, H]``.

        V' is the reduced vocabulary when a ``token_map`` is set (see ``topk_token_ids``). A shared
        ``lm_head_weight`` is used as given (any number of rows: vLLM pads its vocab, training
        may pass a sub-vocabulary), except that a full-size one is narrowed by the token_map.
        A single projection runs as one GEMM over all heads' rows: on CPUs the vocab projection is
        memory-bound, so reading its weight once instead of once per head is most of the cost.
        """
        x = self.residual(hidden, num_heads, token_embeds)
        k, b, h = x.shape
        w = self._projection(lm_head_weight).to(x.dtype)
        if w.shape[0] == 1:
            logits = F.linear(x.reshape(k * b, h), w[0]).view(k, b, -1)
        else:
            logits = torch.bmm(x, w[:k].transpose(1, 2))
        if self.proj_bias is not None:
            bias = self.proj_bias if self.proj_bias.shape[0] == 1 else self.proj_bias[:k]
            logits = logits + bias.unsqueeze(1).to(logits.dtype)
        return logits

    def map_tokens(self, indices: Tensor) -> Tensor:
        """Indices into the logits -> vocabulary token ids (identity without a token_map)."""
        return indices if self.token_map is None else self.token_map[indices]

    def topk_token_ids(self, hidden: Tensor, k: int, lm_head_weight: Tensor | None = None,
                       num_heads: int | None = None, token_embeds: Tensor | None = None) -> Tensor:
        """Token ids ``[K, B, k]`` of the first ``num_heads`` heads' k most likely tokens, best first."""
        logits = self.forward(hidden, lm_head_weight, num_heads, token_embeds)
        return self.map_tokens(logits.topk(k, dim=-1).indices)

    def full_vocab_logits(self, logits: Tensor) -> Tensor:
        """Scatter reduced-vocab logits back to the full vocabulary (``-inf`` elsewhere)."""
        if self.token_map is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.token_map] = logits
        return full

    def zero_blocks(self) -> None:
        """Make every residual block the identity (how Medusa starts training)."""
        with torch.no_grad():
            self.block_weight.zero_()
            if self.block_bias is not None:
                self.block_bias.zero_()
            if self.token_weight is not None:
                self.token_weight.zero_()

    def projection_per_head(self, lm_head_weight: Tensor | None = None) -> Tensor:
        """The vocab projection of each head as ``[K, V', H]`` (expanded view; materialises shared)."""
        return self._projection(lm_head_weight).expand(self.num_heads, -1, -1)

    def fasterdecoding_state_dict(self) -> dict[str, Tensor]:
        """FasterDecoding key layout: ``{h}.{l}.linear.weight/bias`` and ``{h}.{L}.weight``."""
        sd: dict[str, Tensor] = {}
        for h in range(self.num_heads):
            for layer in range(self.num_layers):
                sd[f"{h}.{layer}.linear.weight"] = self.block_weight[h, layer].detach().clone()
                bias = (self.block_bias[h, layer] if self.block_bias is not None
                        else torch.zeros_like(self.block_weight[h, layer, 0]))
                sd[f"{h}.{layer}.linear.bias"] = bias.detach().clone()
            if self.token_weight is not None:
                sd[f"{h}.token.weight"] = self.token_weight[h].detach().clone()
            if not self.shared_lm_head:
                p = h if self.proj_weight.shape[0] > 1 else 0
                sd[f"{h}.{self.num_layers}.weight"] = self.proj_weight[p].detach().clone()
                if self.proj_bias is not None:
                    sd[f"{h}.{self.num_layers}.bias"] = self.proj_bias[p].detach().clone()
        if self.token_map is not None:
            sd["token_map"] = self.token_map.detach().clone()
        return sd


# --------------------------------------------------------------------------------------------------
# Loading


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
    if config.get("token_conditioned") and not token_weights:
        raise _fail(source, "config says token_conditioned but there are no {h}.token.weight tensors")
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
                        token_conditioned=bool(token_weights), dtype=dtype, device=device)

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


# --------------------------------------------------------------------------------------------------
# Saving


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

