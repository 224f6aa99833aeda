"""Plain-torch ground truth for tree attention over vLLM's paged KV cache, plus KV slot copies.

Nothing here needs Triton; everything runs on CPU or GPU tensors.

Layout (vLLM "flash" layout, per layer): ``kv_cache[2, num_blocks, block_size, num_kv_heads,
head_size]``; ``key_cache = kv_cache[0]``, ``value_cache = kv_cache[1]``. Any strided view with
the per-cache shape ``[num_blocks, block_size, num_kv_heads, head_size]`` is accepted (e.g. the
CPU layout ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` transposed and split). Token
at position ``p`` of request ``r`` lives at block ``block_table[r, p // block_size]``, offset
``p % block_size``; its slot id is ``block_id * block_size + offset``.

Mask format (shared by the Triton kernel, the CPU path and the tests):

* request ``r`` owns query rows ``query_start_loc[r] .. query_start_loc[r + 1] - 1``
  (``num_q`` rows); ``ctx_lens[r]`` tokens are already in the cache *before* these rows, and the
  rows' own K/V are already written at positions ``ctx_len .. ctx_len + num_q - 1``;
* ``tree_mask[i]`` (int64) for local row ``i`` of a request: bit ``j`` is set iff local row ``j``
  is an ancestor of row ``i`` or ``i`` itself. Row ``i`` attends to all ``ctx_len`` context tokens
  and to exactly the local rows whose bit is set. A chain is bits ``0..i``;
* a request is *causal* (local row ``i`` sees local rows ``0..i``, ``tree_mask`` ignored) when
  ``tree_mask is None``, when ``causal[r]`` is non-zero, or when ``num_q > 64`` (64 bits cannot
  describe a larger tree; this is how prefills with long prompts go through).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

MAX_TREE_ROWS = 64


def tree_mask_from_parents(parents: Sequence[int], device=None) -> torch.Tensor:
    """Ancestor bitmask (int64 ``[n]``) of a tree given as a parent array.

    ``parents[i]`` is the local index of node ``i``'s parent, or ``-1`` for a root; parents must
    precede their children (``parents[i] < i``), which holds for Medusa's breadth-first order.
    """
    n = len(parents)
    if n > MAX_TREE_ROWS:
        raise ValueError(f"a tree mask holds at most {MAX_TREE_ROWS} rows, got {n}")
    masks: list[int] = []
    for i, p in enumerate(parents):
        p = int(p)
        if p >= i:
            raise ValueError(f"parents[{i}] = {p}: parents must precede their children")
        masks.append((1 << i) | (masks[p] if p >= 0 else 0))
    # Bit 63 is the sign bit of int64.
    signed = [m - (1 << 64) if m >= (1 << 63) else m for m in masks]
    return torch.tensor(signed, dtype=torch.int64, device=device)


def local_mask(
    tree_mask_rows: Optional[torch.Tensor], num_q: int, causal: bool
) -> torch.Tensor:
    """Dense boolean ``[num_q, num_q]`` mask among one request's rows (row attends to column)."""
    if causal or tree_mask_rows is None or num_q > MAX_TREE_ROWS:
        return torch.ones(num_q, num_q, dtype=torch.bool).tril_()
    bits = tree_mask_rows.to(device="cpu", dtype=torch.int64)
    j = torch.arange(num_q, dtype=torch.int64)
    return ((bits[:, None] >> j[None, :]) & 1).bool()


def _gather_tokens(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """K or V of the first ``num_tokens`` positions of one request: ``[n, num_kv_heads, D]``."""
    block_size = cache.shape[1]
    pos = torch.arange(num_tokens, device=cache.device)
    blocks = block_ids.to(cache.device, torch.long)[pos // block_size]
    return cache[blocks, pos % block_size]


def tree_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    ctx_lens: torch.Tensor,
    tree_mask: Optional[torch.Tensor],
    scale: float,
    out: Optional[torch.Tensor] = None,
    *,
    causal: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Tree attention over the paged cache, computed densely per request in ``compute_dtype``.

    Same arguments and mask semantics as ``tree_attention_paged``. Rows past
    ``query_start_loc[-1]`` (padding) are set to zero, as are rows that attend to nothing.
    ``out_dtype`` (default ``q.dtype``) is only used when ``out`` is not given.
    """
    total_q, num_heads, head_size = q.shape
    num_kv_heads = key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(total_q, num_heads, head_size, dtype=out_dtype or q.dtype, device=q.device)
    qsl = [int(x) for x in query_start_loc.tolist()]
    ctx = [int(x) for x in ctx_lens.tolist()]
    flags = [bool(x) for x in causal.tolist()] if causal is not None else [False] * len(ctx)
    out[: qsl[0]] = 0
    out[qsl[-1]:] = 0
    for r in range(len(qsl) - 1):
        start, end, c = qsl[r], qsl[r + 1], ctx[r]
        n = end - start
        if n <= 0:
            continue
        k = _gather_tokens(key_cache, block_table[r], c + n).to(compute_dtype)
        v = _gather_tokens(value_cache, block_table[r], c + n).to(compute_dtype)
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        qr = q[start:end].to(device=k.device, dtype=compute_dtype)  # [n, H, D]
        scores = torch.einsum("qhd,khd->hqk", qr, k) * scale  # [H, n, L]
        mask = torch.ones(n, c + n, dtype=torch.bool)
        rows = tree_mask[start:end] if tree_mask is not None else None
        mask[:, c:] = local_mask(rows, n, flags[r])
        mask = mask.to(k.device)
        scores = scores.masked_fill(~mask, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(mask.any(dim=-1)[None, :, None], probs, torch.zeros_like(probs))
        o = torch.einsum("hqk,khd->qhd", probs, v)
        out[start:end] = o.to(device=out.device, dtype=out.dtype)
    return out


def flash_layout_copy_slots(
    kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor
) -> torch.Tensor:
    """Copy K and V of slot ``src_slots[i]`` to slot ``dst_slots[i]``, in place.

    ``kv_cache`` is one layer's cache in the flash layout ``[2, num_blocks, block_size,
    num_kv_heads, head_size]`` (any strides). The result is exactly that of applying the copies
    one after another in list order, so chains of copies are safe: a copy that reads a slot
    written by an earlier copy gets the value that copy wrote, and when several copies write the
    same slot the last one wins. Negative slot ids (vLLM's ``PAD_SLOT_ID = -1``) on either side
    make the copy a no-op, so fixed-size padded index tensors work.

    Implemented as one gather and one scatter with no host synchronisation (CUDA-graph
    friendly): the read-after-write chains are resolved on the device by pointer jumping over an
    ``[n, n]`` comparison, which is cheap for the few hundred copies of a Medusa step.
    For Medusa compaction (``src = slot(ctx + n_j)``, ``dst = slot(ctx + j)``, ``n_j >= j``
    increasing) no copy reads another's destination and this is a plain parallel copy.
    """
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"expected kv_cache [2, num_blocks, block_size, H, D], got {tuple(kv_cache.shape)}")
    device = kv_cache.device
    src = src_slots.reshape(-1).to(device=device, dtype=torch.long)
    dst = dst_slots.reshape(-1).to(device=device, dtype=torch.long)
    if src.shape != dst.shape:
        raise ValueError(f"src_slots and dst_slots differ in size: {src.numel()} vs {dst.numel()}")
    n = src.numel()
    if n == 0:
        return kv_cache
    block_size = kv_cache.shape[2]
    idx = torch.arange(n, device=device)
    valid = (src >= 0) & (dst >= 0)

    # Copy i reads what the last earlier valid copy j writing slot src[i] wrote, if any.
    earlier = (dst[None, :] == src[:, None]) & (idx[None, :] < idx[:, None]) & valid[None, :]
    writer = torch.where(earlier, idx[None, :], -1).amax(dim=1)
    parent = torch.where(writer >= 0, writer, idx)
    for _ in range(max(1, math.ceil(math.log2(n))) + 1):  # parents strictly decrease
        parent = parent[parent]
    eff_src = src[parent]

    # Several copies to one slot: all of them write the value of the last one.
    same_dst = (dst[None, :] == dst[:, None]) & valid[None, :]
    last = torch.where(same_dst, idx[None, :], -1).amax(dim=1)
    eff_src = torch.where(last >= 0, eff_src[last.clamp(min=0)], eff_src)

    # Padded copies duplicate the last valid copy (or copy slot 0 onto itself if there is none).
    last_valid = torch.where(valid, idx, -1).amax()
    has_valid = last_valid >= 0
    lv = last_valid.clamp(min=0)
    pad_src = torch.where(has_valid, eff_src[lv], torch.zeros_like(lv))
    pad_dst = torch.where(has_valid, dst[lv], torch.zeros_like(lv))
    eff_src = torch.where(valid, eff_src, pad_src)
    eff_dst = torch.where(valid, dst, pad_dst)

    values = kv_cache[:, eff_src // block_size, eff_src % block_size]  # gather: [2, n, H, D]
    kv_cache[:, eff_dst // block_size, eff_dst % block_size] = values
    return kv_cache
