"""Triton tree-verification attention over vLLM's paged KV cache.

Why: verifying a Medusa tree runs all its nodes as query rows of one step, and each node must see
the context plus its own ancestors only. vLLM's Triton attention can add a ``qq_bias`` over the
query-to-query block, but it is one 2-D bias shared by the whole batch, so it cannot express a
different tree (or tree size) per request. This kernel takes a per-row ancestor bitmask instead.

Layout (vLLM flash layout, per layer ``kv[2, num_blocks, block_size, num_kv_heads, head_size]``):
``key_cache = kv[0]``, ``value_cache = kv[1]``, each ``[num_blocks, block_size, num_kv_heads,
head_size]`` with any strides; ``block_table[num_reqs, max_blocks]`` (int32); position ``p`` of
request ``r`` is at block ``block_table[r, p // block_size]``, offset ``p % block_size``.

Mask format: request ``r`` owns query rows ``query_start_loc[r] ..< query_start_loc[r+1]``
(``num_q`` rows) and has ``ctx_lens[r]`` cached tokens before them; the rows' own K/V are already
in the cache at positions ``ctx_len ..< ctx_len + num_q``. ``tree_mask[row]`` (int64): bit ``j``
is set iff local row ``j`` is an ancestor of the row or the row itself. Every row sees the whole
context plus the local rows whose bit is set. A request is plain causal (bitmask ignored) when
``tree_mask is None``, ``causal[r] != 0``, or ``num_q > 64`` (long prefills).
See ``vllm_medusa.kernels.reference`` for the float64 ground truth and mask helpers.

One program per (request, block of query rows, kv head); the program holds the whole GQA group
of that kv head so each K/V tile is loaded once. It streams the context through the block table,
then the request's own rows with the bitmask, with an fp32 online softmax.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_TREE_ROWS = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q,
    k_cache_ptr, v_cache_ptr, bt_row_ptr,
    pos, pos_valid, allowed,
    kv_head, offs_d, d_valid,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One online-softmax step over the KV positions ``pos`` (a tile, gathered via the block table).

    ``allowed[m, t]`` says whether row ``m`` may attend to ``pos[t]``; positions with
    ``pos_valid`` false are never read.
    """
    phys = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=pos_valid, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    k_base = phys * stride_kb + off * stride_ks + kv_head * stride_kh  # [TILE_N]
    v_base = phys * stride_vb + off * stride_vs + kv_head * stride_vh
    k = tl.load(
        k_cache_ptr + k_base[None, :] + offs_d[:, None] * stride_kd,
        mask=d_valid[:, None] & pos_valid[None, :], other=0.0,
    )  # [HEAD_PAD, TILE_N]
    v = tl.load(
        v_cache_ptr + v_base[:, None] + offs_d[None, :] * stride_vd,
        mask=pos_valid[:, None] & d_valid[None, :], other=0.0,
    )  # [TILE_N, HEAD_PAD]
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if DOT_FP32:  # exact: products of 16-bit floats fit fp32 (interpreter work-around)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE_DOT:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = tl.where(allowed, s * qk_scale, float("-inf"))  # log2 domain
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows with nothing allowed so far keep m = -inf; shift by 0 to avoid (-inf) - (-inf).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v_cache_ptr.dtype.element_ty)  # P is rounded to the input dtype, as on tensor cores
    if DOT_FP32:
        p = p.to(tl.float32)
    if IEEE_DOT:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p, v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_table_ptr, query_start_loc_ptr, ctx_lens_ptr, tree_mask_ptr, causal_ptr,
    qk_scale, num_reqs, total_q,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # q heads per kv head
    GROUP_PAD: tl.constexpr,  # next power of 2
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query rows per program
    TILE_N: tl.constexpr,  # KV positions per step
    HAS_TREE_MASK: tl.constexpr,
    HAS_CAUSAL_FLAGS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    req = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_n = tl.arange(0, TILE_N)
    d_valid = offs_d < HEAD_SIZE
    head = kv_head * GROUP + offs_m % GROUP_PAD  # q head of each tile row
    head_valid = (offs_m % GROUP_PAD) < GROUP

    if req == num_reqs:
        # Extra program row: zero the padding rows past query_start_loc[num_reqs], if any.
        pad_start = tl.load(query_start_loc_ptr + num_reqs)
        step = tl.num_programs(1) * BLOCK_Q
        for base in range(pad_start + q_block * BLOCK_Q, total_q, step):
            rows = base + offs_m // GROUP_PAD
            o_ptrs = (out_ptr + rows.to(tl.int64)[:, None] * stride_ot
                      + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
            o_mask = (rows < total_q)[:, None] & head_valid[:, None] & d_valid[None, :]
            tl.store(o_ptrs, tl.zeros([BLOCK_M, HEAD_PAD], dtype=out_ptr.dtype.element_ty), mask=o_mask)
        return

    q_start = tl.load(query_start_loc_ptr + req)
    num_q = tl.load(query_start_loc_ptr + req + 1) - q_start
    if q_block * BLOCK_Q >= num_q:
        return
    ctx_len = tl.load(ctx_lens_ptr + req)

    local_row = q_block * BLOCK_Q + offs_m // GROUP_PAD  # row index within the request
    row_valid = (local_row < num_q) & head_valid
    rows = (q_start + local_row).to(tl.int64)

    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_valid[None, :], other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    is_causal = num_q > 64
    if HAS_CAUSAL_FLAGS:
        is_causal = is_causal | (tl.load(causal_ptr + req) != 0)
    if not HAS_TREE_MASK:
        is_causal = True
    if HAS_TREE_MASK:
        bits = tl.load(tree_mask_ptr + rows, mask=row_valid, other=0).to(tl.int64)
    else:
        bits = tl.zeros([BLOCK_M], dtype=tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    bt_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt

    # 1) Context: every valid row sees every cached token.
    for start in range(0, ctx_len, TILE_N):
        pos = start + offs_n
        pos_valid = pos < ctx_len
        allowed = row_valid[:, None] & pos_valid[None, :]
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr,
            pos, pos_valid, allowed, kv_head, offs_d, d_valid,
            stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_SIZE, IEEE_DOT, DOT_FP32,
        )

    # 2) This step's rows: ancestors by bitmask (tree) or j <= i (causal). A causal row never
    #    looks past the last row of this block; a tree row may, in principle, see any of its <= 64.
    last_row = tl.minimum(num_q, (q_block + 1) * BLOCK_Q)
    own_end = tl.where(is_causal, last_row, num_q)
    for start in range(0, own_end, TILE_N):
        j = start + offs_n  # local row index of each key
        pos_valid = j < own_end
        causal_ok = j[None, :] <= local_row[:, None]
        shift = tl.minimum(j, 63).to(tl.int64)
        tree_ok = ((bits[:, None] >> shift[None, :]) & 1) != 0
        allowed = row_valid[:, None] & pos_valid[None, :] & tl.where(is_causal, causal_ok, tree_ok)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr,
            ctx_len + j, pos_valid, allowed, kv_head, offs_d, d_valid,
            stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_SIZE, IEEE_DOT, DOT_FP32,
        )

    # Rows that attended to nothing (or are padding) get zeros, never NaN.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def _interpreting() -> bool:
    # Triton's CPU interpreter multiplies bf16 operands of tl.dot as their raw uint16 bit
    # patterns (triton 3.9), so there the kernel feeds tl.dot exact fp32 copies instead.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tree_attention_paged(
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
    max_query_len: Optional[int] = None,
) -> torch.Tensor:
    """Tree-verification attention; returns ``out`` ``[total_q, num_heads, head_size]``.

    q: ``[total_q, num_heads, head_size]`` (fp16/bf16/fp32); key_cache/value_cache:
    ``[num_blocks, block_size, num_kv_heads, head_size]`` (any strides, same dtype as q);
    block_table: ``[num_reqs, max_blocks]`` int32; query_start_loc: ``[num_reqs + 1]`` int32;
    ctx_lens: ``[num_reqs]`` int32 tokens cached before this step's rows; tree_mask:
    ``[total_q]`` int64 ancestor bitmasks or None (all causal); causal: optional ``[num_reqs]``
    per-request flag forcing causal rows. Rows past ``query_start_loc[-1]`` are zeroed.
    ``max_query_len`` sizes the grid; if omitted it is read from ``query_start_loc`` (one host
    sync; pass it under CUDA graphs).
    """
    if q.dim() != 3 or key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"expected q [T, H, D] and caches [blocks, block_size, kv_heads, D]; got "
            f"{tuple(q.shape)}, {tuple(key_cache.shape)}, {tuple(value_cache.shape)}"
        )
    total_q, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, cache_head_size = key_cache.shape
    if cache_head_size != head_size:
        raise ValueError(f"head size mismatch: q {head_size}, cache {cache_head_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_size < 16:
        raise ValueError(f"head_size must be >= 16, got {head_size}")
    if key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, caches {key_cache.dtype}/{value_cache.dtype}")
    num_reqs = block_table.shape[0]
    if query_start_loc.numel() != num_reqs + 1 or ctx_lens.numel() != num_reqs:
        raise ValueError("query_start_loc must have num_reqs + 1 entries and ctx_lens num_reqs")
    if tree_mask is not None and (tree_mask.dtype != torch.int64 or tree_mask.numel() < total_q):
        raise ValueError("tree_mask must be int64 with one entry per query row")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    if total_q == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) if num_reqs else 0

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    head_pad = max(16, triton.next_power_of_2(head_size))
    # BLOCK_M = BLOCK_Q * group_pad rows per program: 64 when the group allows it, >= 16 for tl.dot.
    block_q = max(1, 64 // group_pad)
    block_q = min(block_q, max(triton.next_power_of_2(max(max_query_len, 1)), 16 // min(group_pad, 16)))
    tile_n = 32 if head_pad <= 128 else 16
    num_q_blocks = max(1, triton.cdiv(max(max_query_len, 1), block_q))

    has_tree = tree_mask is not None
    has_flags = causal is not None
    if has_flags and causal.dtype == torch.bool:
        causal = causal.to(torch.int32)
    grid = (num_reqs + 1, num_q_blocks, num_kv_heads)
    _tree_attention_kernel[grid](
        out, q, key_cache, value_cache,
        block_table, query_start_loc, ctx_lens,
        tree_mask if has_tree else query_start_loc,  # dummy pointer when unused
        causal if has_flags else query_start_loc,
        scale * _LOG2E, num_reqs, total_q,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), value_cache.stride(3),
        block_table.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        HAS_TREE_MASK=has_tree,
        HAS_CAUSAL_FLAGS=has_flags,
        IEEE_DOT=q.dtype == torch.float32,
        DOT_FP32=q.dtype == torch.bfloat16 and _interpreting(),
        num_warps=4,
    )
    return out
