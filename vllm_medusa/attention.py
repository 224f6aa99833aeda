"""Tree attention on the paged KV cache (CPU path), as plain torch.

vLLM's CPU kernel takes no custom mask: it runs every row causally over linear positions. That is
exact for prefills and for chain drafts, so it still runs for the whole batch; afterwards the rows of
requests whose tree is not a chain are recomputed here: each tree row attends to the request's
context (whole blocks read through the block table) and to its ancestors among the tree rows (one
int64 ancestor bitmask per row, the format the GPU kernel shares).
All tree requests of a step are padded into one batched SDPA call per layer; query heads that share a
KV head are stacked along the rows, so K/V are never repeated for GQA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from vllm_medusa.kv_cache import CpuKVLayout
from vllm_medusa.trees import masks_to_dense


@dataclass
class TreeAttentionBatch:
    """Everything the attention layers need for one step's tree rows (built once per step).

    ``row_index[r, i]`` is the batch row of tree row i of tree request r (padded with the request's
    first row); ``block_ids[r]`` the request's context blocks (padded with block 0);
    ``mask[r, i, j]`` whether row i may attend to key j of (context blocks, tree rows).
    """

    row_index: torch.Tensor  # [R, N] int64
    row_valid: torch.Tensor  # [R, N] bool
    block_ids: torch.Tensor  # [R, B] int64
    mask: torch.Tensor  # [R, N, B * block_size + N] bool
    all_valid: bool

    @staticmethod
    def build(query_starts: Sequence[int], ancestor_masks: Sequence[Sequence[int]],
              ctx_lens: Sequence[int], block_ids: Sequence[torch.Tensor], block_size: int,
              device: torch.device | str = "cpu") -> "TreeAttentionBatch":
        """One entry per tree request: first batch row, per-row ancestor bitmasks, context length
        and the block ids that hold the context."""
        r = len(query_starts)
        n = max(len(m) for m in ancestor_masks)
        nb = max(max((len(b) for b in block_ids), default=0), 1)
        c = nb * block_size
        row_index = torch.zeros(r, n, dtype=torch.int64)
        row_valid = torch.zeros(r, n, dtype=torch.bool)
        blocks = torch.zeros(r, nb, dtype=torch.int64)
        mask = torch.zeros(r, n, c + n, dtype=torch.bool)
        for i, (start, masks, ctx, b) in enumerate(zip(query_starts, ancestor_masks, ctx_lens, block_ids)):
            k = len(masks)
            row_index[i] = start
            row_index[i, :k] = torch.arange(start, start + k)
            row_valid[i, :k] = True
            blocks[i, :len(b)] = b
            mask[i, :k, :ctx] = True
            mask[i, :k, c:c + k] = masks_to_dense(torch.tensor(masks, dtype=torch.int64), k)
            mask[i, k:, c + k:] = torch.eye(n - k, dtype=torch.bool)  # padding rows: no NaN
        return TreeAttentionBatch(row_index.to(device), row_valid.to(device), blocks.to(device),
                                  mask.to(device), bool(row_valid.all()))


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   k_ctx: torch.Tensor, v_ctx: torch.Tensor, batch: TreeAttentionBatch,
                   scale: float) -> torch.Tensor:
    """Attention of the tree rows; returns ``[R, N, num_heads, head_size]`` (padding rows included).

    ``query``/``key``/``value`` are this step's rows ``[T, heads, head_size]`` (keys already
    rotated); ``k_ctx``/``v_ctx`` the gathered context ``[R, kv_heads, C, head_size]``.
    Computed in float32: the tree path must agree with plain decoding to the last bit that matters.
    """
    idx = batch.row_index
    r, n = idx.shape
    hk, d = k_ctx.shape[1], k_ctx.shape[3]
    hq = query.shape[1]
    g = hq // hk
    k = torch.cat([k_ctx.float(), key[idx].float().transpose(1, 2)], dim=2)  # [R, Hk, C+N, D]
    v = torch.cat([v_ctx.float(), value[idx].float().transpose(1, 2)], dim=2)
    # Stack the g query heads of each KV head along the rows: [R, Hk, g * N, D].
    q = query[idx].float().view(r, n, hk, g, d).permute(0, 2, 3, 1, 4).reshape(r, hk, g * n, d)
    mask = batch.mask[:, None, None].expand(r, 1, g, n, -1).reshape(r, 1, g * n, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.view(r, hk, g, n, d).permute(0, 3, 1, 2, 4).reshape(r, n, hq, d)


def paged_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         kv_cache: torch.Tensor, layout: CpuKVLayout, batch: TreeAttentionBatch,
                         scale: float, output: torch.Tensor) -> None:
    """Overwrite ``output`` (``[T, heads, head_size]``) at the tree rows with tree attention."""
    k_ctx, v_ctx = layout.gather_blocks(kv_cache, batch.block_ids)
    out = tree_attention(query, key, value, k_ctx, v_ctx, batch, scale).to(output.dtype)
    if batch.all_valid:
        output.index_copy_(0, batch.row_index.reshape(-1), out.reshape(-1, *out.shape[2:]))
    else:
        output[batch.row_index[batch.row_valid]] = out[batch.row_valid]
