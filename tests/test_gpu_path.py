"""The GPU path without a GPU: layouts, compaction and the tree pass under the Triton interpreter;
the end-to-end GPU test runs only where CUDA is present."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_medusa.gpu_runner import GpuTreeBatch, copy_slots, kv_views, run_tree_pass  # noqa: E402
from vllm_medusa.kernels.reference import tree_attention_reference  # noqa: E402
from vllm_medusa.trees import MC_SIM_7B_63, MedusaTree  # noqa: E402

H, D, BS = 2, 64, 16


def _caches():
    torch.manual_seed(0)
    flash = torch.randn(2, 8, BS, H, D)
    triton = torch.empty(8, H, BS, 2 * D)
    triton[..., :D] = flash[0].transpose(1, 2)
    triton[..., D:] = flash[1].transpose(1, 2)
    return flash, triton


def test_kv_views_agree_across_layouts():
    flash, triton = _caches()
    for a, b in zip(kv_views(flash, D), kv_views(triton, D)):
        assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="unsupported KV cache layout"):
        kv_views(torch.zeros(3, 4, 5), D)


@pytest.mark.parametrize("layout", ["flash", "triton"])
def test_copy_slots_across_block_boundary(layout):
    flash, triton = _caches()
    cache = flash if layout == "flash" else triton
    k, v = kv_views(cache, D)
    before_k, before_v = k.clone(), v.clone()
    src = torch.tensor([BS + 1, BS + 5])  # rows in the next block
    dst = torch.tensor([BS - 1, BS])  # last slot of one block, first of the next
    copy_slots(k, v, src, dst)
    for s, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(k[d // BS, d % BS], before_k[s // BS, s % BS])
        assert torch.equal(v[d // BS, d % BS], before_v[s // BS, s % BS])
    assert torch.equal(k[0, :BS - 1], before_k[0, :BS - 1])


@pytest.mark.parametrize("layout", ["flash", "triton"])
def test_tree_pass_overwrites_only_tree_rows(layout):
    pytest.importorskip("triton")
    flash, triton = _caches()
    cache = flash if layout == "flash" else triton
    trees = [MedusaTree.from_paths(MC_SIM_7B_63[:9]), MedusaTree.from_paths(MC_SIM_7B_63[:4])]
    ctx = [20, 3]
    block_table = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0], [6, 7, 0, 0]], dtype=torch.int32)
    # batch rows: request 0 (tree) at 0.., a plain row, request 2 (tree) after it
    entries = [(0, 0, ctx[0], trees[0]), (2, trees[0].num_rows + 1, ctx[1], trees[1])]
    total = trees[0].num_rows + 1 + trees[1].num_rows
    q = torch.randn(total, 4, D)
    out = torch.full((total, 4 * D), 7.0)
    batch = GpuTreeBatch.build(entries, block_table)
    run_tree_pass(q, cache, D, D ** -0.5, out, batch)
    k, v = kv_views(cache, D)
    ref = tree_attention_reference(q[batch.row_index], k, v, batch.block_table, batch.query_start_loc,
                                   batch.ctx_lens, batch.tree_mask, D ** -0.5)
    got = out.view(total, 4, D)[batch.row_index]
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-4, rtol=1e-4)
    assert torch.all(out[trees[0].num_rows] == 7.0)  # the plain row is untouched


def test_gpu_worker_class_builds_without_cuda():
    pytest.importorskip("vllm")
    from vllm_medusa import gpu_runner

    worker = gpu_runner.MedusaGPUWorker
    assert worker.__name__ == "MedusaGPUWorker" and hasattr(worker, "_make_model_runner")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_greedy_equals_plain(tmp_path):
    from tests.engine_checks import greedy_equality_check

    greedy_equality_check(device="cuda")


# --------------------------------------------------------------------------- attention-backend guard


class _Backend:
    def __init__(self, name):
        self.name = name

    def get_name(self):
        return self.name


def _layer(impl_cls, backend="FLASHINFER", attn_type="decoder"):
    from types import SimpleNamespace

    impl = impl_cls()
    impl.attn_type = attn_type
    return SimpleNamespace(impl=impl, attn_backend=_Backend(backend), attn_type=attn_type)


class FlashInferImpl:
    pass


class TreeAwareImpl:
    medusa_tree_aware = True


def test_unwrapped_backend_is_refused():
    pytest.importorskip("vllm")
    from vllm_medusa.gpu_runner import TREE_BACKENDS
    from vllm_medusa.runner import AttentionBackendError, require_tree_attention

    good = {"model.layers.0.self_attn.attn": _layer(TreeAwareImpl, "FLASH_ATTN"),
            "vision.encoder.attn": _layer(FlashInferImpl, attn_type="encoder_only"),
            "model.norm": object()}
    require_tree_attention(good, TREE_BACKENDS)
    bad = {**good, **{f"model.layers.{i}.self_attn.attn": _layer(FlashInferImpl) for i in (1, 2)}}
    with pytest.raises(AttentionBackendError) as err:
        require_tree_attention(bad, TREE_BACKENDS)
    msg = str(err.value)
    assert "FLASHINFER (FlashInferImpl) in 2 layer(s), e.g. 'model.layers.1.self_attn.attn'" in msg
    assert "Supported backends: FLASH_ATTN, TRITON_ATTN" in msg and "--attention-backend" in msg


def test_runner_checks_attention_after_the_model_loads():
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm_medusa.gpu_runner import TREE_BACKENDS
    from vllm_medusa.runner import AttentionBackendError, MedusaTreeRunnerMixin

    class Base:
        def load_model(self, *, load_dummy_weights=False):
            self.loaded = True

    class Runner(MedusaTreeRunnerMixin, Base):
        medusa_tree_backends = TREE_BACKENDS

    runner = Runner()
    runner.compilation_config = SimpleNamespace(static_forward_context={"attn": _layer(FlashInferImpl)})
    with pytest.raises(AttentionBackendError, match="FLASHINFER"):
        runner.load_model()
    assert runner.loaded
    runner.compilation_config.static_forward_context = {"attn": _layer(TreeAwareImpl, "TRITON_ATTN")}
    runner.load_model()


@pytest.fixture
def restore_backend_overrides():
    from vllm.v1.attention.backends import registry

    saved = dict(registry._ATTN_OVERRIDES)
    yield
    registry._ATTN_OVERRIDES.clear()
    registry._ATTN_OVERRIDES.update(saved)


def test_install_gpu_attention_twice_wraps_once(restore_backend_overrides):
    pytest.importorskip("vllm")
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_medusa.gpu_runner import TREE_BACKENDS, install_gpu_attention

    install_gpu_attention()
    first = {n: AttentionBackendEnum[n].get_path() for n in TREE_BACKENDS}
    install_gpu_attention()
    for name in TREE_BACKENDS:
        assert AttentionBackendEnum[name].get_path() == first[name]
        backend = resolve_obj_by_qualname(first[name])
        assert backend.get_name() == name
        impl = backend.get_impl_cls()
        wrappers = [c for c in impl.__mro__ if "medusa_tree_aware" in vars(c)]
        assert len(wrappers) == 1 and impl.medusa_tree_aware
