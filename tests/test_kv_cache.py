"""Compaction and gathering on a paged cache, against a dense reference."""

import pytest
import torch

from vllm_medusa.kv_cache import CpuKVLayout, compaction_moves


def _transposed_k_writer(bs: int, hs: int):
    """Reference writer: K stored transposed per (block, head) as vLLM's `vec` ISA does, V row-major."""
    def write(k, v, kc, vc, slots):
        for t, s in enumerate(slots.tolist()):
            b, o = divmod(s, bs)
            for head in range(k.shape[1]):
                kc[b, head].reshape(-1).view(hs, bs)[:, o] = k[t, head]
                vc[b, head, o] = v[t, head]
    return write


@pytest.fixture(params=["vllm", "reference"])
def layout_and_writer(request):
    bs, hs = 16, 32
    if request.param == "vllm":
        ops = pytest.importorskip("vllm._custom_ops")
        write = lambda k, v, kc, vc, s: ops.cpu_attn_reshape_and_cache(k, v, kc, vc, s, "vec")  # noqa: E731
        return CpuKVLayout.probe(write, bs, hs, torch.bfloat16), write
    write = _transposed_k_writer(bs, hs)
    return CpuKVLayout.probe(write, bs, hs, torch.bfloat16), write


def test_gather_reads_what_was_written(layout_and_writer):
    layout, write = layout_and_writer
    torch.manual_seed(0)
    nb, h, bs, hs = 6, 2, layout.block_size, layout.head_size
    kv = torch.zeros(nb, h, bs, 2 * hs, dtype=torch.bfloat16)
    kc, vc = kv.view(nb, h, 2 * bs, hs).chunk(2, dim=2)
    slots = torch.randperm(nb * bs)[:40]
    k = torch.randn(40, h, hs).bfloat16()
    v = torch.randn(40, h, hs).bfloat16()
    write(k, v, kc, vc, slots)
    gk, gv = layout.gather(kv, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)


def test_compaction_across_block_boundary(layout_and_writer):
    """A request whose context ends near a block end: tree rows span two blocks, accepted rows
    1->1, 4->2, 9->3 must land in the first slots after the root, the rest untouched."""
    layout, write = layout_and_writer
    torch.manual_seed(1)
    nb, h, bs, hs = 4, 3, layout.block_size, layout.head_size
    kv = torch.zeros(nb, h, bs, 2 * hs, dtype=torch.bfloat16)
    kc, vc = kv.view(nb, h, 2 * bs, hs).chunk(2, dim=2)
    block_ids = [2, 0, 3]  # non-contiguous physical blocks
    ctx = bs - 3  # root at position ctx, tree rows cross into the next block
    positions = torch.arange(ctx + 12)
    slot_of = lambda p: block_ids[p // bs] * bs + p % bs  # noqa: E731
    slots = torch.tensor([slot_of(int(p)) for p in positions])
    k = torch.randn(len(slots), h, hs).bfloat16()
    v = torch.randn(len(slots), h, hs).bfloat16()
    write(k, v, kc, vc, slots)
    step_slots = slots[ctx:]  # this step's rows: root + 11 nodes
    src, dst = compaction_moves(step_slots, [0], [[1, 4, 9]])
    layout.copy_slots(kv, src, dst)
    expect_k, expect_v = k.clone(), v.clone()
    for j, n in enumerate([1, 4, 9], start=1):
        expect_k[ctx + j], expect_v[ctx + j] = k[ctx + n], v[ctx + n]
    gk, gv = layout.gather(kv, slots)
    assert torch.equal(gk, expect_k) and torch.equal(gv, expect_v)


def test_compaction_moves_skip_rows_in_place():
    sm = torch.arange(100, 120)
    src, dst = compaction_moves(sm, [0, 10], [[1, 2], [2, 5]])
    assert src.tolist() == [112, 115] and dst.tolist() == [111, 112]


def _vllm_layout(isa: str, bs: int, hs: int, dtype: torch.dtype) -> CpuKVLayout:
    ops = pytest.importorskip("vllm._custom_ops")
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    write = lambda k, v, kc, vc, s: ops.cpu_attn_reshape_and_cache(k, v, kc, vc, s, isa)  # noqa: E731
    return CpuKVLayout.probe(write, bs, hs, dtype)


@pytest.mark.parametrize("kind", ["transposed", "plain", "shuffled", "reversed", "vllm-vec", "vllm-amx",
                                  "vllm-vec16"])
def test_read_blocks_matches_slot_gather(kind):
    """Every packing vLLM writes is read as a strided view (no element-wise gather), and reads the
    same values as the slot-by-slot gather; an arbitrary permutation still reads correctly."""
    bs, hs, nb, h = 16, 32, 5, 2
    n = bs * hs
    dtype = torch.float32
    if kind == "transposed":
        layout = CpuKVLayout.probe(_transposed_k_writer(bs, hs), bs, hs)
    elif kind == "plain":
        layout = CpuKVLayout.plain(bs, hs)
    elif kind == "shuffled":
        perm = torch.randperm(2 * n, generator=torch.Generator().manual_seed(0))
        layout = CpuKVLayout(perm[:n].view(bs, hs), perm[n:].view(bs, hs), bs, hs)
        assert layout.k_strides is None
    elif kind == "reversed":  # slots stored last to first: strided, but with a negative stride
        base = torch.arange(n).view(bs, hs)
        layout = CpuKVLayout(base.flip(0), base + n, bs, hs)
        assert layout.k_strides is None and layout.v_strides is not None
    else:
        isa = kind.split("-")[1]
        bs, hs, dtype = {"amx": (32, 64, torch.bfloat16), "vec": (16, 64, torch.bfloat16),
                         "vec16": (16, 80, torch.bfloat16)}[isa]
        layout = _vllm_layout(isa, bs, hs, dtype)
        assert layout.k_strides is not None and layout.v_strides is not None
    kv = torch.randn(nb, h, bs, 2 * hs).to(dtype)
    block_ids = torch.tensor([[3, 1], [4, 0]])
    kt = torch.full((2, h, hs, 2 * bs + 3), float("nan"))  # slices of wider buffers, as in use
    v = torch.full((2, h, 2 * bs + 3, hs), float("nan"))
    layout.read_blocks(kv, block_ids, kt[..., :2 * bs], v[:, :, :2 * bs])
    for r in range(2):
        slots = (block_ids[r, :, None] * bs + torch.arange(bs)).reshape(-1)
        gk, gv = layout.gather(kv, slots)
        assert torch.equal(kt[r, ..., :2 * bs], gk.permute(1, 2, 0).float())
        assert torch.equal(v[r, :, :2 * bs], gv.transpose(0, 1).float())


def test_several_kv_cache_groups_are_refused():
    from types import SimpleNamespace

    from vllm_medusa.kv_cache import require_single_kv_cache_group

    class FullAttentionSpec: ...

    class SlidingWindowSpec: ...

    one = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=FullAttentionSpec(),
                                                           layer_names=["l0", "l1"])])
    require_single_kv_cache_group(one)
    two = SimpleNamespace(kv_cache_groups=[*one.kv_cache_groups,
                                           SimpleNamespace(kv_cache_spec=SlidingWindowSpec(),
                                                           layer_names=["l2"])])
    with pytest.raises(NotImplementedError, match=r"one KV-cache group; this model has 2: "
                                                  r"FullAttentionSpec \(2 layer\(s\)\), SlidingWindowSpec"):
        require_single_kv_cache_group(two)


def test_runner_checks_kv_cache_groups_before_allocating():
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm_medusa.runner import MedusaTreeRunnerMixin

    calls = []

    class Base:
        def initialize_kv_cache(self, kv_cache_config, is_profiling=False):
            calls.append(is_profiling)

    class Runner(MedusaTreeRunnerMixin, Base):
        pass

    group = SimpleNamespace(kv_cache_spec=None, layer_names=[])
    Runner().initialize_kv_cache(SimpleNamespace(kv_cache_groups=[group]), is_profiling=True)
    assert calls == [True]
    with pytest.raises(NotImplementedError, match="has 2"):
        Runner().initialize_kv_cache(kv_cache_config=SimpleNamespace(kv_cache_groups=[group, group]))
    assert calls == [True]
