"""CPU wiring: the Medusa runner on ``CPUModelRunner`` and tree attention on vLLM's ``CPU_ATTN`` backend.

Same flow as the GPU path (``gpu_runner.py``): vLLM's CPU attention runs for the whole batch, then
``MedusaCPUAttentionImpl`` recomputes the rows of non-chain trees with their ancestor masks
(``attention.py``), reading the paged cache through the packing learned by ``cpu_kv_layout``
(``kv_cache.py``). The shared hooks are in ``runner.py``.
"""

from __future__ import annotations

import time

import torch

from vllm_medusa.attention import paged_tree_attention
from vllm_medusa.kv_cache import CpuKVLayout
from vllm_medusa.runner import (PROFILE, TREE_ATTENTION, MedusaTreeRunnerMixin, MedusaWorkerMixin,
                                _swap, builtin_logitsprocs)


_LAYOUTS: dict[tuple, CpuKVLayout] = {}


def cpu_kv_layout(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> CpuKVLayout:
    """The CPU cache packing for this ISA and shape, learned once through vLLM's own write op."""
    key = (isa, block_size, head_size, dtype)
    if key not in _LAYOUTS:
        from vllm import _custom_ops as ops

        def write(k, v, kc, vc, slots):
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)

        _LAYOUTS[key] = CpuKVLayout.probe(write, block_size, head_size, dtype)
    return _LAYOUTS[key]


def _cpu_attention_impl_cls():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    from vllm_medusa.compat import resolve

    AttentionType = resolve("AttentionType")

    class MedusaCPUAttentionImpl(CPUAttentionBackendImpl):
        """vLLM's CPU attention, then tree rows recomputed with their ancestor masks."""

        medusa_tree_aware = True

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                     output_scale, output_block_scale)
            batch = TREE_ATTENTION.batch
            if batch is None or attn_metadata is None or self.attn_type != AttentionType.DECODER:
                return result
            nb, _, block_size, _ = kv_cache.shape
            layout = cpu_kv_layout(layer.isa, block_size, self.head_size, kv_cache.dtype)
            out = output.view(output.shape[0], self.num_heads, self.head_size)
            t0 = time.perf_counter() if PROFILE else 0.0
            paged_tree_attention(query, key, value, kv_cache, layout, batch, self.scale, out)
            if PROFILE:
                TREE_ATTENTION.seconds += time.perf_counter() - t0
            return result

    class MedusaCPUAttentionBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return MedusaCPUAttentionImpl

    return MedusaCPUAttentionBackend


def install_cpu_attention() -> None:
    """Point vLLM's ``CPU_ATTN`` entry at the tree-aware subclass (the platform always picks it)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    cls = _cpu_attention_impl_cls()
    globals()["MedusaCPUAttentionBackend"] = cls
    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.MedusaCPUAttentionBackend")


def _make_cpu_runner_cls():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    class MedusaCPUModelRunner(MedusaTreeRunnerMixin, CPUModelRunner):
        def __init__(self, vllm_config, device):
            with builtin_logitsprocs():
                super().__init__(vllm_config, device)
            self._medusa_init()

        def initialize_kv_cache(self, *args, **kwargs):
            result = super().initialize_kv_cache(*args, **kwargs)
            # Learn the cache packing now, not in the first tree step (the policy times steps).
            for kv in self.kv_caches:
                if kv is not None:
                    self._medusa_layout(kv)
                    break
            return result

        def _medusa_layout(self, kv: torch.Tensor) -> CpuKVLayout:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            head_size = kv.shape[-1] // 2
            isa = _get_attn_isa(kv.dtype, kv.shape[2], head_size, self.cache_config.cache_dtype)
            return cpu_kv_layout(isa, kv.shape[2], head_size, kv.dtype)

        def _medusa_copy_slots(self, kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
            self._medusa_layout(kv).copy_slots(kv, src, dst)

        def _medusa_tree_pass(self, kv, query, key, value, output, batch, scale):
            paged_tree_attention(query, key, value, kv, self._medusa_layout(kv), batch, scale,
                                 output.view(query.shape))

    return MedusaCPUModelRunner


def _make_cpu_worker_cls():
    from vllm.v1.worker import cpu_worker

    class MedusaCPUWorker(MedusaWorkerMixin, cpu_worker.CPUWorker):
        """CPU worker that builds the Medusa runner and installs tree-aware CPU attention."""

        def __init__(self, *args, **kwargs):
            install_cpu_attention()
            super().__init__(*args, **kwargs)

        def init_device(self):
            runner_cls = _make_cpu_runner_cls()
            with _swap(cpu_worker, "CPUModelRunner", runner_cls):
                super().init_device()

    return MedusaCPUWorker


def __getattr__(name: str):
    # The classes subclass vLLM's and are built on first use, so importing this module (e.g. in
    # the front-end process or in unit tests) does not import vLLM's worker stack.
    if name == "MedusaCPUWorker":
        cls = _make_cpu_worker_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
