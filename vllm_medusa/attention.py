"""Tree attention on the paged KV cache (CPU path), as plain torch.

vLLM's CPU kernel takes no custom mask: it runs every row causally over linear positions. That is
exact for prefills and for chain drafts, so it still runs for the whole batch; afterwards the rows of
requests whose tree is not a chain are recomputed here: each tree row attends to the request's
context (whole blocks read through the block table) and to its ancestors among the tree rows (one
int64 ancestor bitmask per row, the format the GPU kernel shares).
All tree requests of a step are padded into one batched matmul - softmax - matmul per layer; query
heads that share a KV head are stacked along the rows, so K/V are never repeated for GQA. It runs in
every layer of a tree step, so it is written for few small ops: the per-step pieces (ancestor bias,
row indices) are built once, and each operand is converted and placed with a single copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

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
    start: int | None = None  # first batch row when all tree rows are one run (same-size trees, back to back)
    _biases: dict = field(default_factory=dict, repr=False)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, ...]`` at the tree rows, ``[R, N, ...]``: a view when the rows are one run."""
        if self.start is not None:
            r, n = self.row_index.shape
            return x[self.start:self.start + r * n].view(r, n, *x.shape[1:])
        return x[self.row_index]

    def head_bias(self, g: int, kv_heads: int) -> torch.Tensor:
        """``mask`` as an additive float bias (0 / -inf) for the ``g`` query heads stacked per KV
        head, one matrix per (request, KV head): ``[R * kv_heads, g * N, K]``, built once per step
        rather than in every layer."""
        key = (g, kv_heads)
        if key not in self._biases:
            r, n, keys = self.mask.shape
            bias = torch.zeros((r, kv_heads, g, n, keys), dtype=torch.float32, device=self.mask.device)
            bias.masked_fill_(~self.mask[:, None, None], float("-inf"))
            self._biases[key] = bias.view(r * kv_heads, g * n, keys)
        return self._biases[key]

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
        all_valid = bool(row_valid.all())
        run = all_valid and torch.equal(row_index.view(-1), torch.arange(query_starts[0], query_starts[0] + r * n))
        return TreeAttentionBatch(row_index.to(device), row_valid.to(device), blocks.to(device),
                                  mask.to(device), all_valid, query_starts[0] if run else None)


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   layout: CpuKVLayout, batch: TreeAttentionBatch, scale: float) -> torch.Tensor:
    """Attention of the tree rows; returns ``[R, N, kv_heads, g, head_size]`` float32, where the
    ``kv_heads * g`` query heads are in vLLM's order (padding rows included).

    ``query``/``key``/``value`` are this step's rows ``[T, heads, head_size]`` (keys already
    rotated); the context is read from the paged ``kv_cache`` through ``layout``. Computed in
    float32: the tree path must agree with plain decoding to the last bit that matters.
    """
    r, n = batch.row_index.shape
    hk, d = kv_cache.shape[1], query.shape[-1]
    g = query.shape[1] // hk
    c = batch.block_ids.shape[1] * layout.block_size
    rows = batch.rows
    # K is laid out transposed, [R, Hk, D, keys], so the scores are one batched matmul.
    kt = torch.empty((r, hk, d, c + n), dtype=torch.float32, device=query.device)
    v = torch.empty((r, hk, c + n, d), dtype=torch.float32, device=query.device)
    layout.read_blocks(kv_cache, batch.block_ids, kt[..., :c], v[:, :, :c])
    kt[..., c:].copy_(rows(key).permute(0, 2, 3, 1))
    v[:, :, c:].copy_(rows(value).transpose(1, 2))
    # Stack the g query heads of each KV head along the rows: [R * Hk, g * N, D].
    q = torch.empty((r, hk, g, n, d), dtype=torch.float32, device=query.device)
    q.copy_(rows(query).view(r, n, hk, g, d).permute(0, 2, 3, 1, 4))
    scores = torch.baddbmm(batch.head_bias(g, hk), q.view(r * hk, g * n, d), kt.view(r * hk, d, c + n),
                           alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.view(r * hk, c + n, d))
    return out.view(r, hk, g, n, d).permute(0, 3, 1, 2, 4)


def paged_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         kv_cache: torch.Tensor, layout: CpuKVLayout, batch: TreeAttentionBatch,
                         scale: float, output: torch.Tensor) -> None:
    """Overwrite ``output`` (``[T, heads, head_size]``) at the tree rows with tree attention."""
    out = tree_attention(query, key, value, kv_cache, layout, batch, scale)
    r, n = batch.row_index.shape
    if batch.start is not None:  # the tree rows are one run: write them in place
        output[batch.start:batch.start + r * n].view(out.shape).copy_(out)
        return
    rows = torch.empty(out.shape, dtype=output.dtype, device=output.device)
    rows.copy_(out)
    rows = rows.view(r, n, *output.shape[1:])
    if batch.all_valid:
        output.index_copy_(0, batch.row_index.reshape(-1), rows.view(-1, *output.shape[1:]))
    else:
        output[batch.row_index[batch.row_valid]] = rows[batch.row_valid]
