"""Triton tree attention vs the float64 reference, run on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import random

import pytest
import torch

from vllm_medusa.kernels.cases import (CASES, NUM_RANDOM_SEEDS, TOL, case_batch, make_batch,
                                       random_batch, random_parents, relative_error)
from vllm_medusa.kernels.reference import flash_layout_copy_slots, tree_mask_from_parents

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable ({exc!r}); Triton kernel tests skipped", allow_module_level=True)

from vllm_medusa.kernels.tree_attention_triton import tree_attention_paged  # noqa: E402


def check(inputs, dtype):
    rel = relative_error(tree_attention_paged, inputs, dtype)
    assert rel < TOL[dtype], f"relative error {rel:.3e} for {dtype} (inf: NaN in the kernel output)"
    return rel


# The matrix lives in vllm_medusa/kernels/cases.py, shared with `python -m vllm_medusa.gpu_check`.
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tree_attention_matches_reference(case):
    rel = check(case_batch(case), case.dtype)
    print(f"max relative error {rel:.2e}")


@pytest.mark.parametrize("seed", range(NUM_RANDOM_SEEDS))
def test_random_batches(seed):
    """Fuzz: ragged batches of random trees (and the odd causal request) with random contexts."""
    inputs, dtype, what = random_batch(seed)
    rel = check(inputs, dtype)
    print(f"{what}: max relative error {rel:.2e}")


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
