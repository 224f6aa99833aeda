"""The Medusa heads module: K residual-block heads with stacked weights, drafting from the last hidden state.

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

Path-conditioned heads (``token_conditioning: "path"`` in the config) go one step further: head k
sees the token just before the one it guesses, t+1+k: the bonus token for head 0, the drafted
token of the node above for the others. A tree is then drafted depth by depth (one batched head
call per depth over the nodes that have children), and a node's children are guesses given its
own token (Hydra's sequentially dependent heads, without their extra inputs).

Weights are stacked across heads so a forward pass is one batched matmul per block layer and one
GEMM for the projection, instead of a Python loop over heads.

Reading checkpoints lives in ``head_checkpoints.py``, saving and conversion in ``head_export.py``;
their public names are re-exported here, so ``from vllm_medusa.heads import ...`` covers all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Re-exported: the loader and the writers are part of this module's public interface.
from vllm_medusa.head_checkpoints import (  # noqa: F401
    FASTERDECODING_PICKLE,
    FASTERDECODING_WEIGHTS,
    VLLM_WEIGHTS,
    MedusaHeadsError,
    checkpoint_num_heads,
    load_medusa_heads,
)
from vllm_medusa.head_export import convert_to_vllm_medusa, save_medusa_heads  # noqa: F401


def path_tokens(tokens: Tensor, num_heads: int, rows: Tensor | None = None) -> Tensor:
    """``tokens [N]``, the tokens produced at N consecutive positions -> ``[K, R]``: at each of
    ``rows`` (default all) for head k, the token produced at row + k, the one a path-conditioned
    head k sees (clamped at the end; training data has no target there, so what is read does not
    matter)."""
    if rows is None:
        rows = torch.arange(tokens.shape[0], device=tokens.device)
    at = rows.unsqueeze(0) + torch.arange(num_heads, device=tokens.device).unsqueeze(1)
    return tokens[at.clamp(max=max(tokens.shape[0] - 1, 0))]


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
                 token_conditioned: bool = False, path_conditioned: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"need >= 1 head and >= 0 layers, got {num_heads} heads, {num_layers} layers")
        if token_conditioned and num_layers < 1:
            raise ValueError("token-conditioned heads need at least one residual block")
        if path_conditioned and not token_conditioned:
            raise ValueError("path-conditioned heads are token-conditioned heads (token_conditioned=True)")
        self.path_conditioned = path_conditioned
        self._packed: list[Tensor] = []
        self._packed_key: tuple[int, int] | None = None
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
        tc = (", path-conditioned" if self.path_conditioned else
              ", token-conditioned" if self.token_conditioned else "")
        return (f"heads={self.num_heads}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"vocab={self.vocab_size}, {kind}{tm}{tc}")

    def residual(self, hidden: Tensor, num_heads: int | None = None,
                 token_embeds: Tensor | None = None, first: int = 0) -> Tensor:
        """The residual blocks of ``num_heads`` heads (default all) from head ``first`` on:
        ``[B, H] -> [K, B, H]``.

        ``token_embeds``: input embeddings of the tokens the heads are conditioned on (needed by,
        and only by, token-conditioned heads): ``[B, H]``, the token produced from ``hidden``, for
        every head, or ``[K, B, H]``, one token per head (path-conditioned heads: head k sees the
        token just before the one it guesses).
        """
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be [B, {self.hidden_size}], got {tuple(hidden.shape)}")
        if self.token_conditioned != (token_embeds is not None):
            raise ValueError("these Medusa heads are token-conditioned: pass token_embeds"
                             if self.token_conditioned else
                             "token_embeds given, but these Medusa heads are not token-conditioned")
        k = self.num_heads - first if num_heads is None else num_heads
        if not 0 <= first < first + k <= self.num_heads:
            raise ValueError(f"heads {first}..{first + k - 1} asked of {self.num_heads} Medusa heads")
        if token_embeds is not None and tuple(token_embeds.shape[-2:]) != tuple(hidden.shape) or (
                token_embeds is not None and token_embeds.dim() == 3 and token_embeds.shape[0] != k):
            raise ValueError(f"token_embeds must be {tuple(hidden.shape)} or {(k, *hidden.shape)}, "
                             f"got {tuple(token_embeds.shape)}")
        if self.path_conditioned and k > 1 and token_embeds is not None and token_embeds.dim() == 2:
            raise ValueError("path-conditioned heads see one token per head: pass token_embeds "
                             f"[{k}, B, H] (or ask for one head at a time)")
        heads = slice(first, first + k)
        x = hidden.to(self.block_weight.dtype).unsqueeze(0).expand(k, -1, -1)
        for layer in range(self.num_layers):
            w = self._layer_weight(layer)[heads].transpose(1, 2)
            if self.block_bias is not None:
                y = torch.baddbmm(self.block_bias[heads, layer].unsqueeze(1), x, w)
            else:
                y = torch.bmm(x, w)
            if layer == 0 and token_embeds is not None:
                e = token_embeds.to(x.dtype)
                e = e if e.dim() == 3 else e.unsqueeze(0).expand(k, -1, -1)
                y = torch.baddbmm(y, e, self.token_weight[heads].transpose(1, 2))
            x = x + F.silu(y)
        return x

    def _layer_weight(self, layer: int) -> Tensor:
        """All heads' weights of one block layer, ``[K, H, H]``. With two or more layers these are
        strided across heads in ``block_weight [K, L, H, H]``, and a CPU bmm copies such an operand
        on every call (1.5 ms instead of 0.3 for 4 heads of 576 at batch 1); outside autograd a
        contiguous copy per layer is kept until the weights change (their version counter)."""
        w = self.block_weight[:, layer]
        if w.is_contiguous() or torch.is_grad_enabled():
            return w
        key = (self.block_weight.data_ptr(), self.block_weight._version)
        if key != self._packed_key:
            self._packed = [self.block_weight[:, i].contiguous() for i in range(self.num_layers)]
            self._packed_key = key
        return self._packed[layer]

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
                num_heads: int | None = None, token_embeds: Tensor | None = None,
                first: int = 0) -> Tensor:
        """Logits ``[K, B, V']`` of ``num_heads`` heads (default all) from ``first`` on for ``[B, H]``.

        V' is the reduced vocabulary when a ``token_map`` is set (see ``topk_token_ids``). A shared
        ``lm_head_weight`` is used as given (any number of rows: vLLM pads its vocab, training
        may pass a sub-vocabulary), except that a full-size one is narrowed by the token_map.
        A single projection runs as one GEMM over all heads' rows: on CPUs the vocab projection is
        memory-bound, so reading its weight once instead of once per head is most of the cost.
        """
        x = self.residual(hidden, num_heads, token_embeds, first)
        k, b, h = x.shape
        w = self._projection(lm_head_weight).to(x.dtype)
        if w.shape[0] == 1:
            logits = F.linear(x.reshape(k * b, h), w[0]).view(k, b, -1)
        else:
            logits = torch.bmm(x, w[first:first + k].transpose(1, 2))
        if self.proj_bias is not None:
            bias = self.proj_bias if self.proj_bias.shape[0] == 1 else self.proj_bias[first:first + k]
            logits = logits + bias.unsqueeze(1).to(logits.dtype)
        return logits

    def map_tokens(self, indices: Tensor) -> Tensor:
        """Indices into the logits -> vocabulary token ids (identity without a token_map)."""
        return indices if self.token_map is None else self.token_map[indices]

    def topk_token_ids(self, hidden: Tensor, k: int, lm_head_weight: Tensor | None = None,
                       num_heads: int | None = None, token_embeds: Tensor | None = None,
                       first: int = 0) -> Tensor:
        """Token ids ``[K, B, k]`` of the heads' k most likely tokens, best first (``forward``)."""
        logits = self.forward(hidden, lm_head_weight, num_heads, token_embeds, first)
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
