"""CPU tree attention on the paged cache against the float64 reference, with vLLM's own KV writer."""

import pytest
import torch

from vllm_medusa.attention import TreeAttentionBatch, paged_tree_attention
from vllm_medusa.kernels.reference import tree_attention_reference
from vllm_medusa.kv_cache import CpuKVLayout
from vllm_medusa.trees import MC_SIM_7B_63, MedusaTree, chain

ops = pytest.importorskip("vllm._custom_ops")


@pytest.mark.parametrize("dtype,isa", [(torch.float32, "vec"), (torch.bfloat16, "vec"), (torch.bfloat16, "amx")])
@pytest.mark.parametrize("which", [[0, 1, 2], [1], [2, 3]], ids=["three-requests", "one-request", "one-run"])
def test_ragged_trees_match_reference(dtype, isa, which):
    """Several ragged tree requests (the padded batched path), a single one, and same-size trees
    back to back (both read and written in place as one run), on the cache packings vLLM writes
    (``amx``: bf16 on CPUs with AMX tiles)."""
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    torch.manual_seed(0)
    bs, hk, hq, d = 32, 3, 9, 64
    write = lambda k, v, kc, vc, s: ops.cpu_attn_reshape_and_cache(k, v, kc, vc, s, isa)  # noqa: E731
    layout = CpuKVLayout.probe(write, bs, d, dtype)
    trees = [MedusaTree.from_paths(MC_SIM_7B_63[:20]), MedusaTree.from_paths(MC_SIM_7B_63),
             MedusaTree.from_paths([(0,), (1,), (0, 0)]), MedusaTree.from_paths([(0,), (0, 0), (1,)])]
    # empty context, one ending just before a block boundary, several blocks
    ctx_lens = [0, 31, 70, 45]
    trees, ctx_lens = [trees[i] for i in which], [ctx_lens[i] for i in which]
    nb = 16
    kv = torch.zeros(nb, hk, bs, 2 * d, dtype=dtype)
    kc, vc = kv.view(nb, hk, 2 * bs, d).chunk(2, dim=2)
    flash_k = torch.zeros(nb, bs, hk, d, dtype=dtype)
    flash_v = torch.zeros_like(flash_k)
    perm = torch.randperm(nb)
    block_tables, q_rows, k_rows, v_rows, starts, ctx_blocks = [], [], [], [], [], []
    next_block, row = 0, 0
    for tree, ctx in zip(trees, ctx_lens):
        total = ctx + tree.num_rows
        nblk = (total + bs - 1) // bs
        blocks = perm[next_block:next_block + nblk]
        next_block += nblk
        block_tables.append(torch.cat([blocks, torch.zeros(8 - nblk, dtype=torch.long)]))
        slots = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:total]
        k = torch.randn(total, hk, d).to(dtype)
        v = torch.randn(total, hk, d).to(dtype)
        write(k, v, kc, vc, slots)
        flash_k.view(-1, hk, d)[slots] = k
        flash_v.view(-1, hk, d)[slots] = v
        q_rows.append(torch.randn(tree.num_rows, hq, d).to(dtype))
        k_rows.append(k[ctx:])
        v_rows.append(v[ctx:])
        starts.append(row)
        ctx_blocks.append(blocks[:(ctx + bs - 1) // bs])
        row += tree.num_rows
    q, key, value = torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows)
    batch = TreeAttentionBatch.build(starts, [t.ancestor_masks for t in trees], ctx_lens, ctx_blocks, bs)
    assert (batch.start is not None) == (len(which) != 3)
    out = torch.full_like(q, float("nan"))
    paged_tree_attention(q, key, value, kv, layout, batch, d ** -0.5, out)
    qsl = torch.tensor(starts + [row], dtype=torch.int32)
    masks = torch.cat([t.ancestor_mask_tensor() for t in trees])
    ref = tree_attention_reference(q, flash_k, flash_v, torch.stack(block_tables).int(), qsl,
                                   torch.tensor(ctx_lens, dtype=torch.int32), masks, d ** -0.5)
    assert not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)


def test_chain_mask_is_causal():
    tree = MedusaTree.from_paths(chain(4))
    dense = tree.dense_mask()
    assert torch.equal(dense, torch.tril(torch.ones(5, 5, dtype=torch.bool)))


class _TimingRunner:
    """What ``MedusaTreeRunnerMixin._medusa_time_tree_pass`` reads from a runner: vLLM's block
    table, the KV caches and the model's shapes; the tree pass is the CPU one on a plain packing."""

    def __init__(self, max_model_len: int, bs: int = 16, max_reqs: int = 8, num_blocks: int = 160):
        from types import SimpleNamespace

        from vllm.v1.worker.block_table import BlockTable

        width = -(-max_model_len // bs)
        self.input_batch = SimpleNamespace(max_num_reqs=max_reqs, block_table=[
            BlockTable(bs, max_reqs, width, 2048, False, torch.device("cpu"), 1)])
        self.kv_caches = [torch.zeros(num_blocks, 3, bs, 2 * 64) for _ in range(2)]
        self.max_model_len = max_model_len
        self.model_config = SimpleNamespace(get_num_attention_heads=lambda pc: 9,
                                            get_num_kv_heads=lambda pc: 3, get_head_size=lambda: 64)
        self.parallel_config = None
        self.kv_cache_config = SimpleNamespace(num_blocks=num_blocks)
        self.scheduler_config = SimpleNamespace(max_num_batched_tokens=2048)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.layout = CpuKVLayout.plain(bs, 64)

    def _medusa_tree_pass(self, kv, query, key, value, output, batch, scale):
        paged_tree_attention(query, key, value, kv, self.layout, batch, scale, output.view(query.shape))


@pytest.mark.parametrize("max_model_len", [2048, 64, 16])
def test_start_up_tree_pass_timing(max_model_len):
    """The start-up measurement times enough shapes to fit the cost model, clears the block-table
    rows it borrowed, and shortens its context (or skips) when max_model_len is short, rather
    than failing the engine's start."""
    from vllm_medusa.policy import StepCostModel
    from vllm_medusa.runner import MedusaTreeRunnerMixin

    runner = _TimingRunner(max_model_len)
    for name in ("_medusa_time_tree_pass", "_medusa_attention_batch"):
        setattr(runner, name, getattr(MedusaTreeRunnerMixin, name).__get__(runner))
    tree = MedusaTree.from_paths(MC_SIM_7B_63[:16])
    points = runner._medusa_time_tree_pass(tree, repeats=1)
    table = runner.input_batch.block_table[0]
    assert not table.block_table.np.any() and not table.num_blocks_per_row.any()
    if max_model_len == 16:  # not even the tree fits beside a context
        assert points == {}
        return
    assert {r for r, _ in points} == {1, 2, 4, 8} and {n for _, n in points} == {4, 16}
    assert all(sec > 0 for sec in points.values())
    assert StepCostModel().fit_tree_pass(points).tree_pass_cost(1, 16) > 0
    assert runner._medusa_time_tree_pass(MedusaTree.from_paths(chain(4))) == {}
