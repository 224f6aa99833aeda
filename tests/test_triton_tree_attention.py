"""Triton tree attention vs the float64 reference, run on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import random

import pytest
import torch

from vllm_medusa.kernels.reference import (
    flash_layout_copy_slots,
    tree_attention_reference,
    tree_mask_from_parents,
)

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable ({exc!r}); Triton kernel tests skipped", allow_module_level=True)

from vllm_medusa.kernels.tree_attention_triton import tree_attention_paged  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def random_parents(n: int, rng: random.Random) -> list[int]:
    """Random tree in topological order: one root (the sampled token) and random parents."""
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def make_batch(ctx_lens, trees, *, num_heads, num_kv_heads, head_size, block_size, dtype, seed,
               causal=None, pad_rows=0):
    """Paged cache filled with NaN except the slots each request owns, plus the step's inputs.

    ``trees[r]`` is a parent list (tree mode) or an int (number of causal rows).
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
    return dict(
        q=q, key_cache=kv[0], value_cache=kv[1], block_table=block_table, query_start_loc=qsl,
        ctx_lens=torch.tensor(ctx_lens, dtype=torch.int32), tree_mask=tree_mask,
        scale=head_size ** -0.5,
        causal=None if causal is None else torch.tensor(causal, dtype=torch.int32),
    ), kv


def check(inputs, dtype):
    out = torch.full_like(inputs["q"], float("nan"))
    res = tree_attention_paged(**inputs, out=out)
    assert res is out
    ref = tree_attention_reference(**inputs, out_dtype=torch.float64)
    assert not torch.isnan(out).any(), "NaN in kernel output (unwritten element or NaN read)"
    err = (out.double() - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    assert rel < TOL[dtype], f"relative error {rel:.3e} (abs {err:.3e}) for {dtype}"
    return rel


CASES = [
    # ctx_lens, trees (parent lists, or int = causal rows), heads, kv heads, head size, block, dtype
    pytest.param([0, 32, 45], [5, 13, 1], 8, 2, 64, 16, torch.bfloat16, id="bf16-d64-b16-gqa"),
    pytest.param([31, 64, 7], [64, 9, 3], 8, 2, 128, 32, torch.float32, id="fp32-d128-b32-gqa-64nodes"),
    pytest.param([17, 0], [26, 4], 4, 4, 128, 16, torch.bfloat16, id="bf16-d128-b16-mha"),
    pytest.param([40, 16, 3], [11, 6, 2], 8, 2, 64, 32, torch.float32, id="fp32-d64-b32-gqa"),
    pytest.param([20, 9], [7, 12], 4, 2, 64, 16, torch.float16, id="fp16-d64-b16"),
]


@pytest.mark.parametrize("ctx_lens,sizes,nh,nkv,hs,bs,dtype", CASES)
def test_tree_attention_matches_reference(ctx_lens, sizes, nh, nkv, hs, bs, dtype):
    rng = random.Random(hash((tuple(ctx_lens), tuple(sizes), hs, bs)) & 0xFFFF)
    trees = [random_parents(n, rng) for n in sizes]
    inputs, _ = make_batch(ctx_lens, trees, num_heads=nh, num_kv_heads=nkv, head_size=hs,
                           block_size=bs, dtype=dtype, seed=len(CASES) + hs + bs)
    rel = check(inputs, dtype)
    print(f"max relative error {rel:.2e}")


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed):
    """Fuzz: ragged batches of random trees (and the odd causal request) with random contexts."""
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
                           causal=[int(not isinstance(t, list)) for t in trees])
    rel = check(inputs, dtype)
    print(f"{dtype} heads {nh}/{nkv} d{hs} b{bs} ctx {ctx}: max relative error {rel:.2e}")


def test_chain_mask_equals_causal_flag():
    """A chain bitmask and the causal flag give the same result; causal ignores the bitmask."""
    sizes, ctx = [6, 3], [18, 5]
    chains = [list(range(-1, n - 1)) for n in sizes]
    inputs, _ = make_batch(ctx, chains, num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
                           dtype=torch.float32, seed=3)
    chain_out = tree_attention_paged(**inputs)
    flagged = dict(inputs, causal=torch.ones(2, dtype=torch.int32),
                   tree_mask=torch.zeros_like(inputs["tree_mask"]))  # garbage mask, overridden
    assert torch.allclose(tree_attention_paged(**flagged), chain_out, atol=1e-5, rtol=0)
    no_mask = dict(inputs, tree_mask=None)
    assert torch.allclose(tree_attention_paged(**no_mask), chain_out, atol=1e-5, rtol=0)
    check(flagged, torch.float32)


def test_mixed_prefill_tree_and_padding_rows():
    """Ragged batch: a 70-row prefill (auto-causal, > 64 rows), a flagged causal request, a tree,
    GQA with a non-power-of-two group and head size 96; padding rows past the last request are
    zeroed."""
    rng = random.Random(7)
    trees = [70, 5, random_parents(10, rng)]
    inputs, _ = make_batch([0, 33, 16], trees, num_heads=6, num_kv_heads=2, head_size=96,
                           block_size=16, dtype=torch.bfloat16, seed=5, causal=[0, 1, 0],
                           pad_rows=3)
    check(inputs, torch.bfloat16)
    out = tree_attention_paged(**inputs)
    assert torch.all(out[-3:] == 0)


def test_strided_cpu_layout_cache():
    """Caches given as views of vLLM's CPU layout [blocks, kv_heads, block_size, 2 * head_size],
    and q as a non-contiguous slice of a wider tensor."""
    rng = random.Random(11)
    trees = [random_parents(9, rng), random_parents(4, rng)]
    inputs, kv = make_batch([21, 32], trees, num_heads=4, num_kv_heads=2, head_size=64,
                            block_size=32, dtype=torch.float32, seed=9)
    cpu_layout = torch.cat([kv[0], kv[1]], dim=-1).transpose(1, 2).contiguous()
    k_view, v_view = cpu_layout.transpose(1, 2).split(64, dim=-1)
    assert not k_view.is_contiguous()
    qkv = torch.cat([inputs["q"], torch.randn_like(inputs["q"])], dim=1)  # q as a strided view
    strided = dict(inputs, q=qkv[:, :4], key_cache=k_view, value_cache=v_view)
    check(strided, torch.float32)
    assert torch.allclose(tree_attention_paged(**strided), tree_attention_paged(**inputs), atol=1e-6)


def test_tree_mask_from_parents():
    m = tree_mask_from_parents([-1, 0, 0, 1, 2, 3])
    assert m.tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10101, 0b101011]
    full = tree_mask_from_parents(list(range(-1, 63)))  # 64-node chain uses the sign bit
    assert full[-1].item() == -1


# --------------------------------------------------------------------------- KV slot copies


def _sequential_copy(kv, src, dst):
    kv = kv.clone()
    bs = kv.shape[2]
    for s, d in zip(src, dst):
        if s < 0 or d < 0:
            continue
        kv[:, d // bs, d % bs] = kv[:, s // bs, s % bs]
    return kv


def test_copy_slots_accepted_path_across_block_boundary():
    bs, nkv, hs = 16, 2, 8
    kv = torch.randn(2, 8, bs, nkv, hs)
    blocks = [5, 2]  # logical block 0 -> physical 5, logical 1 -> physical 2
    ctx = 12  # tree rows at positions 12..(12+10), crossing into the second block
    accepted = [0, 2, 5, 9]  # node indices of the accepted path (root first)
    slot = lambda p: blocks[p // bs] * bs + p % bs  # noqa: E731
    src = torch.tensor([slot(ctx + n) for n in accepted])
    dst = torch.tensor([slot(ctx + j) for j in range(len(accepted))])
    expected = _sequential_copy(kv, src.tolist(), dst.tolist())
    before = kv.clone()
    flash_layout_copy_slots(kv, src, dst)
    assert torch.equal(kv, expected)
    for j, n in enumerate(accepted):  # the path's K/V now sit in the first slots
        assert torch.equal(kv[:, blocks[(ctx + j) // bs], (ctx + j) % bs],
                           before[:, blocks[(ctx + n) // bs], (ctx + n) % bs])


def test_copy_slots_chains_duplicates_and_padding():
    bs = 16
    kv = torch.randn(2, 4, bs, 1, 4, dtype=torch.bfloat16)
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randrange(1, 12)
        src = [rng.choice([-1] + list(range(40, 48))) for _ in range(n)]
        dst = [rng.choice([-1] + list(range(40, 48))) for _ in range(n)]
        expected = _sequential_copy(kv, src, dst)
        got = kv.clone()
        flash_layout_copy_slots(got, torch.tensor(src), torch.tensor(dst))
        assert torch.equal(got, expected), (src, dst)
    # A strided (non-contiguous) flash-layout view is updated in place.
    base = torch.randn(4, 2, bs, 1, 4)
    view = base.transpose(0, 1)
    expected = _sequential_copy(view, [17, 18], [15, 16])
    flash_layout_copy_slots(view, torch.tensor([17, 18]), torch.tensor([15, 16]))
    assert torch.equal(base.transpose(0, 1), expected)
