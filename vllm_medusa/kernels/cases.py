"""The tree-attention kernel's correctness matrix, shared by the test suite
(``tests/test_triton_tree_attention.py``, under Triton's interpreter) and the GPU self-check
(``python -m vllm_medusa.gpu_check``), plus the inputs of the self-check's timing table.

Torch only (no Triton, no vLLM): batches are built on any device, checked against the float64
reference of ``reference.py``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_medusa.kernels.reference import tree_attention_reference, tree_mask_from_parents

#: Largest relative error (max abs error / max abs reference) accepted per dtype.
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@dataclass(frozen=True)
class KernelCase:
    id: str
    ctx_lens: tuple[int, ...]
    sizes: tuple[int, ...]  # tree nodes per request (random trees)
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype


CASES = [
    KernelCase("bf16-d64-b16-gqa", (0, 32, 45), (5, 13, 1), 8, 2, 64, 16, torch.bfloat16),
    KernelCase("fp32-d128-b32-gqa-64nodes", (31, 64, 7), (64, 9, 3), 8, 2, 128, 32, torch.float32),
    KernelCase("bf16-d128-b16-mha", (17, 0), (26, 4), 4, 4, 128, 16, torch.bfloat16),
    KernelCase("fp32-d64-b32-gqa", (40, 16, 3), (11, 6, 2), 8, 2, 64, 32, torch.float32),
    KernelCase("fp16-d64-b16", (20, 9), (7, 12), 4, 2, 64, 16, torch.float16),
]
#: One small case per dtype: the self-check's ``--quick`` matrix (and its interpreter run on CPU).
QUICK_CASE_IDS = ("bf16-d64-b16-gqa", "fp32-d64-b32-gqa", "fp16-d64-b16")
NUM_RANDOM_SEEDS = 6


def random_parents(n: int, rng: random.Random) -> list[int]:
    """Random tree in topological order: one root (the sampled token) and random parents."""
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def make_batch(ctx_lens, trees, *, num_heads, num_kv_heads, head_size, block_size, dtype, seed,
               causal=None, pad_rows=0, device="cpu"):
    """Paged cache filled with NaN except the slots each request owns, plus the step's inputs.

    ``trees[r]`` is a parent list (tree mode) or an int (number of causal rows). Returns the
    kernel's keyword arguments and the whole cache ``[2, blocks, block_size, kv_heads, head_size]``.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_qs = [len(t) if isinstance(t, list) else t for t in trees]
    blocks_per_req = [-(-(c + n) // block_size) for c, n in zip(ctx_lens, num_qs)]
    max_blocks = max(blocks_per_req) + 2
    num_blocks = 1 + sum(blocks_per_req) + 3  # block 0 is a NaN-only decoy for padding entries
    physical = list(range(1, num_blocks))
    rng.shuffle(physical)  # scattered, non-monotonic block ids
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), float("nan"), dtype=dtype)
    block_table = torch.zeros(len(trees), max_blocks, dtype=torch.int32)
    masks = []
    for r, (c, n, nb) in enumerate(zip(ctx_lens, num_qs, blocks_per_req)):
        ids = [physical.pop() for _ in range(nb)]
        block_table[r, :nb] = torch.tensor(ids, dtype=torch.int32)
        for p in range(c + n):
            b, o = ids[p // block_size], p % block_size
            kv[:, b, o] = torch.randn(2, num_kv_heads, head_size, generator=gen).to(dtype)
        if isinstance(trees[r], list):
            masks.append(tree_mask_from_parents(trees[r]))
        else:  # causal rows: the bitmask content must not matter
            masks.append(torch.full((n,), -1, dtype=torch.int64))
    total_q = sum(num_qs) + pad_rows
    q = torch.randn(total_q, num_heads, head_size, generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(num_qs).cumsum(0).tolist()), dtype=torch.int32)
    tree_mask = torch.cat(masks + [torch.zeros(pad_rows, dtype=torch.int64)])
    kv = kv.to(device)
    inputs = dict(
        q=q.to(device), key_cache=kv[0], value_cache=kv[1], block_table=block_table.to(device),
        query_start_loc=qsl.to(device), ctx_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(device),
        tree_mask=tree_mask.to(device), scale=head_size ** -0.5,
        causal=None if causal is None else torch.tensor(causal, dtype=torch.int32).to(device),
    )
    return inputs, kv


def case_batch(case: KernelCase, device="cpu"):
    """The inputs of one matrix case (random trees of ``case.sizes`` nodes)."""
    rng = random.Random(hash((case.ctx_lens, case.sizes, case.head_size, case.block_size)) & 0xFFFF)
    trees = [random_parents(n, rng) for n in case.sizes]
    inputs, _ = make_batch(list(case.ctx_lens), trees, num_heads=case.num_heads,
                           num_kv_heads=case.num_kv_heads, head_size=case.head_size,
                           block_size=case.block_size, dtype=case.dtype,
                           seed=len(CASES) + case.head_size + case.block_size, device=device)
    return inputs


def random_batch(seed: int, device="cpu"):
    """Fuzz: a ragged batch of random trees (and the odd causal request) with random contexts.
    Returns (inputs, dtype, description)."""
    rng = random.Random(1000 + seed)
    nh, nkv = rng.choice([(8, 2), (4, 4), (4, 1), (6, 3)])
    hs, bs = rng.choice([64, 128]), rng.choice([16, 32])
    dtype = rng.choice([torch.bfloat16, torch.float32])
    num_reqs = rng.randint(1, 4)
    ctx = [rng.choice([0, bs, 2 * bs, rng.randrange(1, 3 * bs)]) for _ in range(num_reqs)]
    trees = [rng.randint(1, 4) if rng.random() < 0.2 else random_parents(rng.randint(1, 24), rng)
             for _ in range(num_reqs)]
    inputs, _ = make_batch(ctx, trees, num_heads=nh, num_kv_heads=nkv, head_size=hs,
                           block_size=bs, dtype=dtype, seed=seed,
                           causal=[int(not isinstance(t, list)) for t in trees], device=device)
    return inputs, dtype, f"{str(dtype).replace('torch.', '')} heads {nh}/{nkv} d{hs} b{bs} ctx {ctx}"


def relative_error(kernel: Callable, inputs: dict, dtype: torch.dtype) -> float:
    """Run ``kernel(**inputs, out=...)`` and compare with the float64 reference; NaN anywhere in the
    output (an unwritten element or a NaN read) counts as an infinite error."""
    out = torch.full_like(inputs["q"], float("nan"))
    res = kernel(**inputs, out=out)
    assert res is out, "the kernel did not write into the given out tensor"
    ref = tree_attention_reference(**inputs, out_dtype=torch.float64)
    if torch.isnan(out).any():
        return math.inf
    err = (out.double() - ref.double()).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-30)


def bench_batch(num_reqs: int, nodes: int, ctx: int, *, num_heads=32, num_kv_heads=8, head_size=128,
                block_size=16, dtype=torch.bfloat16, device="cuda", seed=0):
    """Timing inputs, built fast on the device: ``num_reqs`` requests of ``ctx`` cached tokens, each
    verifying a random ``nodes``-node tree (its rows' K/V already written after the context)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_per_req = -(-(ctx + nodes) // block_size)
    num_blocks = 1 + num_reqs * blocks_per_req
    block_table = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(num_reqs, blocks_per_req)
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, device=device, dtype=dtype)
    q = torch.randn(num_reqs * nodes, num_heads, head_size, device=device, dtype=dtype)
    masks = torch.cat([tree_mask_from_parents(random_parents(nodes, rng)) for _ in range(num_reqs)])
    return dict(
        q=q, key_cache=kv[0], value_cache=kv[1],
        block_table=block_table.to(device=device, dtype=torch.int32),
        query_start_loc=torch.arange(0, num_reqs * nodes + 1, nodes, dtype=torch.int32, device=device),
        ctx_lens=torch.full((num_reqs,), ctx, dtype=torch.int32, device=device),
        tree_mask=masks.to(device), scale=head_size ** -0.5, max_query_len=nodes,
    )
