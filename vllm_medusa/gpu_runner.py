"""GPU wiring: the Medusa runner on ``GPUModelRunner`` and tree attention with the Triton kernel.

Same flow as the CPU path (``cpu_runner.py``): vLLM's own attention backend runs for the whole batch,
then the rows of non-chain trees are recomputed by ``kernels/tree_attention_triton.py`` straight from
the paged cache. Both of vLLM's GPU cache layouts are read through strided views
``[num_blocks, block_size, num_kv_heads, head_size]``: FlashAttention's ``[2, blocks, bs, H, D]``
and Triton attention's ``[blocks, H, bs, 2 * D]``.

CUDA graphs: the tree masks and rows change every step and are read by Python inside the attention
op. vLLM's piecewise CUDA graphs end at every attention op, which runs eagerly between the pieces,
so engines run compiled with ``cudagraph_mode=PIECEWISE``; full CUDA graphs, which would replay
attention without the tree pass, are refused (``registration.piecewise_cuda_graphs``).

Attention backends: only the impls of ``TREE_BACKENDS`` are wrapped; after the model loads, every
decoder attention layer is checked to run a wrapped impl (``runner.require_tree_attention``), so a
backend chosen by the platform (FLASHINFER on Blackwell), by ``--attention-backend`` or cached
before the wrapping is refused rather than verifying trees with causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_medusa.runner import (TREE_ATTENTION, TREE_AWARE_ATTR, MedusaTreeRunnerMixin,
                                MedusaWorkerMixin, builtin_logitsprocs)
from vllm_medusa.trees import MedusaTree

#: vLLM GPU backends whose impl gets the tree pass (the platform picks one of them for Llama-like
#: models; others are refused at start-up with a clear message).
TREE_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


def kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches as ``[num_blocks, block_size, num_kv_heads, head_size]`` views."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:  # flash layout
        return kv_cache[0], kv_cache[1]
    if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_size:  # triton: [B, H, N, 2D]
        k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return k, v
    raise NotImplementedError(f"unsupported KV cache layout {tuple(kv_cache.shape)}")


def copy_slots(key_cache: torch.Tensor, value_cache: torch.Tensor, src: torch.Tensor,
               dst: torch.Tensor) -> None:
    """Move K/V of ``src`` slots to ``dst`` slots (all reads before writes); views allowed."""
    bs = key_cache.shape[1]
    sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
    for cache in (key_cache, value_cache):
        cache[db, do] = cache[sb, so]


@dataclass
class GpuTreeBatch:
    """The tree requests of a step in the Triton kernel's format (a sub-batch of the step)."""

    row_index: torch.Tensor  # [T] batch rows of the tree requests' query rows
    query_start_loc: torch.Tensor  # [R + 1] int32, into row_index
    block_table: torch.Tensor  # [R, max_blocks] int32
    ctx_lens: torch.Tensor  # [R] int32
    tree_mask: torch.Tensor  # [T] int64 ancestor bitmasks
    max_query_len: int

    @staticmethod
    def build(entries: list[tuple[int, int, int, MedusaTree]], block_table_gpu: torch.Tensor
              ) -> "GpuTreeBatch":
        """``entries``: (request row, first batch row, context length, tree) per tree request."""
        device = block_table_gpu.device
        rows, qsl, masks = [], [0], []
        for _, start, _, tree in entries:
            rows.extend(range(start, start + tree.num_rows))
            qsl.append(qsl[-1] + tree.num_rows)
            masks.extend(tree.ancestor_masks)
        req = torch.tensor([e[0] for e in entries], dtype=torch.int64, device=device)
        return GpuTreeBatch(
            row_index=torch.tensor(rows, dtype=torch.int64).to(device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(device),
            block_table=block_table_gpu[req],
            ctx_lens=torch.tensor([e[2] for e in entries], dtype=torch.int32).to(device),
            tree_mask=torch.tensor(masks, dtype=torch.int64).to(device),
            max_query_len=max(t.num_rows for *_, t in entries),
        )


def run_tree_pass(query: torch.Tensor, kv_cache: torch.Tensor, head_size: int, scale: float,
                  output: torch.Tensor, batch: GpuTreeBatch) -> None:
    """Overwrite the tree rows of ``output`` with tree attention from the paged cache."""
    from vllm_medusa.kernels.tree_attention_triton import tree_attention_paged

    key_cache, value_cache = kv_views(kv_cache, head_size)
    out = tree_attention_paged(query[batch.row_index], key_cache, value_cache, batch.block_table,
                               batch.query_start_loc, batch.ctx_lens, batch.tree_mask, scale,
                               max_query_len=batch.max_query_len)
    output.view(output.shape[0], -1, head_size)[batch.row_index] = out.to(output.dtype)


def _clear_backend_choice_cache() -> None:
    """vLLM caches its attention-backend choice per process (``functools.cache``); a choice made
    before the overrides were registered would keep the unwrapped class."""
    try:
        from vllm.v1.attention import selector
    except ImportError:  # pragma: no cover - moved in another vLLM; the load-time guard still checks
        return
    for name in ("_cached_get_attn_backend",):
        clear = getattr(getattr(selector, name, None), "cache_clear", None)
        if clear is not None:
            clear()


def install_gpu_attention() -> None:
    """Override vLLM's GPU backends with subclasses whose impl adds the tree pass. Idempotent: a
    backend whose registered class is already tree-aware is left as it is (never wrapped twice)."""
    from vllm_medusa.compat import resolve

    AttentionType = resolve("AttentionType")
    AttentionBackendEnum = resolve("AttentionBackendEnum")
    register_backend = resolve("register_backend")
    resolve_obj_by_qualname = resolve("resolve_obj_by_qualname")

    for name in TREE_BACKENDS:
        enum = AttentionBackendEnum[name]
        base_backend = resolve_obj_by_qualname(enum.get_path())
        base_impl = base_backend.get_impl_cls()
        if getattr(base_impl, TREE_AWARE_ATTR, False):
            continue  # installed already

        class Impl(base_impl):  # type: ignore[misc,valid-type]
            medusa_tree_aware = True

            def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *a, **kw):
                result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                         *a, **kw)
                batch = TREE_ATTENTION.batch
                if batch is not None and attn_metadata is not None and \
                        self.attn_type == AttentionType.DECODER:
                    run_tree_pass(query, kv_cache, self.head_size, self.scale, output, batch)
                return result

        Impl.__name__ = Impl.__qualname__ = f"Medusa{base_impl.__name__}"
        backend = type(f"Medusa{base_backend.__name__}", (base_backend,),
                       {"get_impl_cls": staticmethod(lambda impl=Impl: impl)})
        globals()[backend.__name__] = backend
        register_backend(enum, f"{__name__}.{backend.__name__}")
    _clear_backend_choice_cache()


def _make_gpu_worker_cls():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class MedusaGPUModelRunner(MedusaTreeRunnerMixin, GPUModelRunner):
        medusa_tree_backends = TREE_BACKENDS

        def __init__(self, vllm_config, device):
            with builtin_logitsprocs():
                super().__init__(vllm_config, device)
            self._medusa_init()

        def _medusa_attention_batch(self, branching):
            return GpuTreeBatch.build(branching, self.input_batch.block_table[0].block_table.gpu)

        def _medusa_copy_slots(self, kv, src, dst):
            head_size = self.model_config.get_head_size()
            copy_slots(*kv_views(kv, head_size), src, dst)

        def _medusa_tree_pass(self, kv, query, key, value, output, batch, scale):
            run_tree_pass(query, kv, query.shape[-1], scale, output, batch)

    class MedusaGPUWorker(MedusaWorkerMixin, Worker):
        """GPU worker building the Medusa runner (``Worker._make_model_runner`` is meant for this)."""

        def __init__(self, *args, **kwargs):
            install_gpu_attention()
            super().__init__(*args, **kwargs)

        def _make_model_runner(self):
            return MedusaGPUModelRunner(self.vllm_config, self.device)

    return MedusaGPUWorker


def __getattr__(name: str):
    if name == "MedusaGPUWorker":
        cls = _make_gpu_worker_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
