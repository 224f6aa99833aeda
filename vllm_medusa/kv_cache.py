"""Reading and compacting vLLM's paged KV cache, independent of the runner.

Two layouts:
- CPU (``CPU_ATTN``): per layer ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, where
  each (block, kv head) holds a K region then a V region, packed in an ISA-specific order (the
  ``vec`` kernels store K transposed). Rather than hard-coding every packing, :class:`CpuKVLayout`
  learns it once by writing probe values through vLLM's own ``cpu_attn_reshape_and_cache`` op.
- GPU layouts are plain strided views, handled in ``gpu_runner.py``.

Compaction moves the accepted branch's K/V from the slots where the tree rows were written (linear
positions ``ctx + row``) to the first slots after the context (``ctx + 1 .. ctx + d``). Sources are
read before any destination is written, so overlapping moves are safe.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class CpuKVLayout:
    """Where each (slot offset, head dim) of K and V lives inside one (block, kv head) region.

    ``k_index[o, d]`` / ``v_index[o, d]`` are flat offsets into the ``2 * block_size * head_size``
    elements of a (block, kv head) pair.
    """

    def __init__(self, k_index: torch.Tensor, v_index: torch.Tensor, block_size: int, head_size: int):
        self.k_index, self.v_index = k_index, v_index
        self.block_size, self.head_size = block_size, head_size
        # The packings vLLM uses are strided: plain, K transposed, and AMX's VNNI tiles, where a
        # slot and a head dim each split into a few digits with their own strides. Found here, they
        # let a whole block be read with one strided copy instead of an element-wise gather.
        self.k_strides = _strided_packing(k_index)
        self.v_strides = _strided_packing(v_index)

    @staticmethod
    def plain(block_size: int, head_size: int) -> "CpuKVLayout":
        """K then V, each ``[block_size, head_size]`` row-major (used by tests and as a fallback)."""
        base = torch.arange(block_size * head_size).view(block_size, head_size)
        return CpuKVLayout(base, base + block_size * head_size, block_size, head_size)

    @staticmethod
    def probe(write: WriteFn, block_size: int, head_size: int,
              dtype: torch.dtype = torch.float32) -> "CpuKVLayout":
        """Learn the layout by writing probe values through ``write(key, value, kc, vc, slots)``.

        ``write`` has the signature of ``vllm._custom_ops.cpu_attn_reshape_and_cache`` with the ISA
        bound. Each pass writes 1 or 2 (exact in any float dtype) according to one bit of every
        element's logical index, so the index of each stored element is read back bit by bit.
        """
        n = block_size * head_size
        logical = torch.arange(2 * n).view(2, block_size, 1, head_size)
        found = None
        stored_index = torch.zeros(2 * n, dtype=torch.int64)
        for bit in range(max(1, (2 * n - 1).bit_length())):
            kv = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            kc, vc = kv.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
            vals = (1 + ((logical >> bit) & 1)).to(dtype)
            write(vals[0], vals[1], kc, vc, torch.arange(block_size, dtype=torch.int64))
            flat = kv.view(-1).float()
            if found is None:
                found = flat != 0
            stored_index |= (flat == 2).long() << bit
        if found is None or int(found.sum()) != 2 * n:
            raise RuntimeError("could not learn the CPU KV cache layout: the probe write lost values")
        order = torch.empty(2 * n, dtype=torch.int64)
        order[stored_index[found]] = found.nonzero().view(-1)
        return CpuKVLayout(order[:n].view(block_size, head_size), order[n:].view(block_size, head_size),
                           block_size, head_size)

    def _split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slots // self.block_size, slots % self.block_size

    def gather(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots``: two ``[len(slots), num_kv_heads, head_size]`` tensors."""
        nb, h = kv_cache.shape[:2]
        flat = kv_cache.view(nb, h, -1)
        blocks, offs = self._split(slots)
        k = flat[blocks[:, None], :, self.k_index[offs]]  # [T, head_size, H]
        v = flat[blocks[:, None], :, self.v_index[offs]]
        return k.transpose(1, 2), v.transpose(1, 2)

    def read_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, kt_out: torch.Tensor,
                    v_out: torch.Tensor) -> None:
        """Copy (and convert) the K/V of whole blocks ``block_ids [R, nb]`` into ``kt_out [R,
        kv_heads, head_size, nb * block_size]`` (K transposed: the scores are then one matmul) and
        ``v_out [R, kv_heads, nb * block_size, head_size]``, in token order (any strides, e.g.
        slices of larger buffers). One gather of the blocks, then one copy per operand."""
        r, nb = block_ids.shape
        h = kv_cache.shape[1]
        region = 2 * self.block_size * self.head_size
        blocks = kv_cache.index_select(0, block_ids.reshape(-1))
        for out, strides, index, transposed in ((kt_out, self.k_strides, self.k_index, True),
                                                (v_out, self.v_strides, self.v_index, False)):
            if strides is None:  # not strided: an element-wise gather (no vLLM packing needs it)
                src = blocks.view(r, nb, h, region).index_select(-1, index.reshape(-1))
                src = src.view(r, nb, h, self.block_size, self.head_size)
                slot_dims, dim_dims = [(self.block_size, self.head_size)], [(self.head_size, 1)]
            else:
                base, slot_dims, dim_dims = strides
                src = blocks.view(r, nb, h, region)[..., base:]
                sizes = [r, nb, h] + [n for n, _ in slot_dims] + [n for n, _ in dim_dims]
                step = [nb * h * region, h * region, region] + [st for _, st in slot_dims + dim_dims]
                src = src.as_strided(sizes, step, src.storage_offset())
            ns, nd = len(slot_dims), len(dim_dims)
            slots = list(range(3, 3 + ns))
            dims = list(range(3 + ns, 3 + ns + nd))
            order = [0, 2] + (dims + [1] + slots if transposed else [1] + slots + dims)
            shape = [n for n, _ in (dim_dims + [(nb, 0)] + slot_dims if transposed
                                    else [(nb, 0)] + slot_dims + dim_dims)]
            out.view(r, h, *shape).copy_(src.permute(order))

    def copy_slots(self, kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V of ``src`` slots to ``dst`` slots (all sources read before any write)."""
        if src.numel() == 0:
            return
        nb, h = kv_cache.shape[:2]
        flat = kv_cache.view(nb, h, -1)
        sb, so = self._split(src)
        db, do = self._split(dst)
        idx_src = torch.cat([self.k_index[so], self.v_index[so]], dim=1)
        idx_dst = torch.cat([self.k_index[do], self.v_index[do]], dim=1)
        flat[db[:, None], :, idx_dst] = flat[sb[:, None], :, idx_src]


def _digits(offsets: list[int]) -> list[tuple[int, int]] | None:
    """``offsets[i]`` (with ``offsets[0] == 0``) as a mixed-radix sum ``sum(digit_j * stride_j)``:
    the (size, stride) of each digit, outermost first, or None if there is no such split."""
    digits: list[tuple[int, int]] = []
    g = offsets
    while len(g) > 1:
        stride = g[1] - g[0]
        size = 1
        while size < len(g) and g[size] == size * stride:
            size += 1
        if len(g) % size or any(g[q + i] != g[q] + i * stride
                                for q in range(0, len(g), size) for i in range(size)):
            return None
        digits.append((size, stride))
        g = [g[q] - g[0] for q in range(0, len(g), size)]
    return digits[::-1] or [(1, 0)]


def _strided_packing(index: torch.Tensor) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]] | None:
    """``index [block_size, head_size]`` (flat offsets) as ``(base, slot digits, dim digits)``, or
    None when it is not a strided view."""
    base = int(index[0, 0])
    rel = index - base
    slot_digits = _digits(rel[:, 0].tolist())
    dim_digits = _digits(rel[0, :].tolist())
    if slot_digits is None or dim_digits is None or not torch.equal(rel, rel[:, :1] + rel[:1, :]):
        return None
    if any(stride < 0 for _, stride in slot_digits + dim_digits):  # as_strided takes none
        return None
    return base, slot_digits, dim_digits


def require_single_kv_cache_group(kv_cache_config) -> None:
    """Refuse models whose KV cache vLLM splits into several groups (sliding-window + full
    attention layers, hybrid Mamba models, ...). The tree rows' slots, the context blocks read by the
    tree pass and the compaction moves all come from group 0's block table; the layers of another
    group keep their K/V in other blocks, which compaction would then corrupt."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) <= 1:
        return
    kinds = []
    for g in groups:
        spec = getattr(g, "kv_cache_spec", None)
        names = list(getattr(g, "layer_names", []) or [])
        kinds.append(f"{type(spec).__name__} ({len(names)} layer(s))")
    raise NotImplementedError(
        f"medusa_tree supports models with one KV-cache group; this model has {len(groups)}: "
        f"{', '.join(kinds)}. Models mixing attention kinds (sliding window and full attention, "
        f"hybrid Mamba/attention) are not supported yet.")


def compaction_moves(slot_mapping: torch.Tensor, row_starts: Sequence[int],
                     accepted_rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination slots that move each request's accepted tree rows into place.

    ``accepted_rows[r]`` are the accepted node rows of request r (root excluded, ascending, BFS
    order); its tree rows start at ``row_starts[r]`` in ``slot_mapping``. Node row ``n_j`` (the j-th
    accepted, 1-based) goes to row ``j``; moves that are already in place are dropped.
    """
    src: list[int] = []
    dst: list[int] = []
    for start, rows in zip(row_starts, accepted_rows):
        for j, n in enumerate(rows, start=1):
            if n != j:
                src.append(start + n)
                dst.append(start + j)
    if not src:
        empty = torch.empty(0, dtype=torch.int64, device=slot_mapping.device)
        return empty, empty
    index = torch.tensor([src, dst], dtype=torch.int64, device=slot_mapping.device)
    moved = slot_mapping.to(torch.int64)[index]
    return moved[0], moved[1]
