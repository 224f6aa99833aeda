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
        n = block_size * head_size
        plain = torch.arange(n).view(block_size, head_size)
        # The packings vLLM uses today are views: K transposed or plain, V plain, K region first.
        self.k_transposed = torch.equal(k_index, plain.view(head_size, block_size).t())
        self.k_plain = torch.equal(k_index, plain)
        self.v_plain = torch.equal(v_index, plain + n)

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

    def block_views(self, kv_cache: torch.Tensor, block_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks, ``block_ids [R, nb]`` -> two ``[R, kv_heads, nb, block_size,
        head_size]`` views (token order within each request) of one gathered copy, so a caller can
        convert and place them with a single copy."""
        r, nb = block_ids.shape
        bs, hs = self.block_size, self.head_size
        h = kv_cache.shape[1]
        flat = kv_cache.index_select(0, block_ids.reshape(-1)).view(r, nb, h, 2 * bs * hs)
        k_region, v_region = flat[..., : bs * hs], flat[..., bs * hs:]
        if self.k_transposed:
            k = k_region.reshape(r, nb, h, hs, bs).permute(0, 2, 1, 4, 3)
        elif self.k_plain:
            k = k_region.reshape(r, nb, h, bs, hs).permute(0, 2, 1, 3, 4)
        else:
            k = flat.index_select(-1, self.k_index.reshape(-1)).view(r, nb, h, bs, hs).permute(0, 2, 1, 3, 4)
        if self.v_plain:
            v = v_region.reshape(r, nb, h, bs, hs).permute(0, 2, 1, 3, 4)
        else:
            v = flat.index_select(-1, self.v_index.reshape(-1)).view(r, nb, h, bs, hs).permute(0, 2, 1, 3, 4)
        return k, v

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
