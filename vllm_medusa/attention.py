"""Tree attention on the paged KV cache (CPU path), as plain torch.

vLLM's CPU kernel takes no custom mask: it runs every row causally over linear positions. That is
exact for prefills and for chain drafts, so it still runs for the whole batch; afterwards the rows of
requests whose tree is not a chain are recomputed here: each tree row attends to the request's
context (read from the paged cache through the block table) and to its ancestors among the tree
rows (one int64 ancestor bitmask per row, the format the GPU kernel shares).
All tree requests of a step are padded into one batched SDPA call per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from vllm_medusa.kv_cache import CpuKVLayout


def masks_to_dense(masks: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[..., rows]`` int64 ancestor bitmasks -> ``[..., rows, num_rows]`` bool."""
    bits = torch.arange(num_rows, dtype=torch.int64, device=masks.device)
    return ((masks.unsqueeze(-1) >> bits) & 1).bool()


@dataclass
class TreeAttentionBatch:
    """Everything the attention layers need for one step's tree rows (built once per step).

    ``row_index[r, i]`` is the batch row of tree row i of tree request r (padded with 0);
    ``ctx_slots[r, c]`` the cache slot of context token c (padded with 0); ``mask[r, i, j]`` whether
    row i may attend to key j of the concatenation (context, tree rows).
    """

    row_index: torch.Tensor  # [R, N] int64
    row_valid: torch.Tensor  # [R, N] bool
    ctx_slots: torch.Tensor  # [R, C] int64
    mask: torch.Tensor  # [R, N, C + N] bool

    @staticmethod
    def build(query_starts: Sequence[int], ancestor_masks: Sequence[Sequence[int]],
              ctx_slots: Sequence[torch.Tensor], device: torch.device | str = "cpu"
              ) -> "TreeAttentionBatch":
        """One entry per tree request: first batch row, per-row ancestor bitmasks, context slots."""
        r = len(query_starts)
        n = max(len(m) for m in ancestor_masks)
        c = max(max((len(s) for s in ctx_slots), default=0), 1)
        row_index = torch.zeros(r, n, dtype=torch.int64)
        row_valid = torch.zeros(r, n, dtype=torch.bool)
        slots = torch.zeros(r, c, dtype=torch.int64)
        mask = torch.zeros(r, n, c + n, dtype=torch.bool)
        for i, (start, masks, s) in enumerate(zip(query_starts, ancestor_masks, ctx_slots)):
            k, lc = len(masks), len(s)
            row_index[i, :k] = torch.arange(start, start + k)
            row_valid[i, :k] = True
            slots[i, :lc] = s
            mask[i, :k, :lc] = True
            mask[i, :k, c:c + k] = masks_to_dense(torch.tensor(masks, dtype=torch.int64), k)
            mask[i, k:, c + k:] = torch.eye(n - k, dtype=torch.bool)  # padding rows: no NaN
        return TreeAttentionBatch(row_index.to(device), row_valid.to(device), slots.to(device),
                                  mask.to(device))


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   k_ctx: torch.Tensor, v_ctx: torch.Tensor, batch: TreeAttentionBatch,
                   scale: float) -> torch.Tensor:
    """Attention of the tree rows; returns ``[R, N, num_heads, head_size]`` (padding rows included).

    ``query``/``key``/``value`` are this step's rows ``[T, heads, head_size]`` (keys already
    rotated); ``k_ctx``/``v_ctx`` the gathered context ``[R, C, kv_heads, head_size]``.
    Computed in float32: the tree path must agree with plain decoding to the last bit that matters.
    """
    idx = batch.row_index
    q = query[idx].float().transpose(1, 2)  # [R, H, N, D]
    k = torch.cat([k_ctx, key[idx]], dim=1).float().transpose(1, 2)  # [R, Hk, C+N, D]
    v = torch.cat([v_ctx, value[idx]], dim=1).float().transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask[:, None], scale=scale)
    return out.transpose(1, 2)


def paged_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         kv_cache: torch.Tensor, layout: CpuKVLayout, batch: TreeAttentionBatch,
                         scale: float, output: torch.Tensor) -> None:
    """Overwrite ``output`` (``[T, heads, head_size]``) at the tree rows with tree attention."""
    r, c = batch.ctx_slots.shape
    k_ctx, v_ctx = layout.gather(kv_cache, batch.ctx_slots.reshape(-1))
    k_ctx = k_ctx.view(r, c, *k_ctx.shape[1:])
    v_ctx = v_ctx.view(r, c, *v_ctx.shape[1:])
    out = tree_attention(query, key, value, k_ctx, v_ctx, batch, scale)
    valid = batch.row_valid
    output[batch.row_index[valid]] = out[valid].to(output.dtype)
