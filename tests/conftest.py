"""Shared fixtures. Engines are expensive on this CPU (~20-45 s to start), so they are session-scoped
and meant to be reused by every test file.

Fixtures:
- `demo_model`: Path of the bf16 SmolLM2-135M-Instruct checkpoint (converted on first use).
- `tiny_model`: Path of the tiny random float32 Llama (seed 0) with SmolLM2's tokenizer; vLLM
  runs it in bf16 unless given `dtype="float32"`.
- `demo_llm`: one `vllm.LLM` on `demo_model` (eager, max_model_len 2048, 1 GiB KV cache).
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before anything imports vLLM or transformers: no model hub on these machines, and vLLM's CPU
# backend needs an explicit KV-cache size. Note that on CPU this variable wins over an
# `LLM(kv_cache_memory_bytes=...)` argument.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The adaptive policy's saved profiles: one empty folder per test session, so no test depends on
# what an earlier run (or the user's own engines) learned.
os.environ.setdefault("VLLM_MEDUSA_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="vllm-medusa-profiles-"))
# GPU kernels are tested on CPU tensors under Triton's interpreter; the variable must be set before
# anything (vLLM included) imports triton, so it lives here rather than in the kernel tests.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEMO_MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from vllm_medusa.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from vllm_medusa.demo import tiny_model_path

    return tiny_model_path(seed=0)


def shutdown_llm(llm: Any) -> None:
    """Stop an `LLM`'s engine-core process now rather than at interpreter exit, so engines built
    one after another in a session do not pile up on two cores."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


@pytest.fixture(scope="session")
def demo_llm(demo_model: Path) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(
        model=str(demo_model),
        max_model_len=DEMO_MAX_MODEL_LEN,
        enforce_eager=True,
        seed=0,
    )
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="session")
def demo_heads() -> Path:
    from vllm_medusa.demo import demo_heads_path

    path = demo_heads_path()
    assert (path / "config.json").is_file(), f"no Medusa heads at {path}"
    return path
