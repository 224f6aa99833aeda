"""Pieces shared by the offline and online benchmarks: environment, prompts, methods, output files.

Kept free of vLLM imports so the parent processes stay light: engines and servers run in children.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEFAULT_BASE_TREE = "mc_sim_7b_63"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# FastChat's "vicuna_v1.1" template, used by Medusa's own MT-Bench runs, for tokenizers without one.
VICUNA_TEMPLATE = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                   "gives helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def setup_env() -> None:
    """CPU machines here have no model hub and vLLM's CPU backend needs an explicit KV size; on a GPU
    nothing is set, so a GPU user's environment is left as it is."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if on_cpu():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def default_model() -> str:
    from vllm_medusa.demo import demo_model_path

    return str(demo_model_path())


def default_heads() -> str:
    from vllm_medusa.demo import demo_heads_path

    return str(demo_heads_path())


def chain_heads_for(heads: str) -> str:
    """Heads for upstream chain Medusa: these heads, unless they are token-conditioned (upstream
    cannot run them), then the demo model's plain Medusa-1 heads."""
    folder = Path(heads) if Path(heads).is_dir() else Path(heads).parent
    cfg_file = folder / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("token_conditioned"):
        from vllm_medusa.demo import demo_medusa1_heads_path

        return str(demo_medusa1_heads_path())
    return heads


def chain_heads_note(heads: str, chain_heads: str, methods: Sequence[str]) -> str:
    """For a table header: which heads upstream chain Medusa ran, when not ``heads``."""
    if "medusa_chain" not in methods or chain_heads == heads:
        return ""
    return f" (upstream chain Medusa: `{chain_heads}`)"


def bench_prompts(model: str, n: int | None = None) -> list[str]:
    """MT-Bench first turns in the model's chat format (Vicuna v1.1 when the tokenizer has none)."""
    from transformers import AutoTokenizer

    from vllm_medusa.data import load_mtbench, mtbench_prompts

    tok = AutoTokenizer.from_pretrained(model)
    if getattr(tok, "chat_template", None):
        return mtbench_prompts(tok, n=n)
    return [VICUNA_TEMPLATE.format(q["turns"][0]) for q in load_mtbench()[:n]]


def take(pool: Sequence[str], n: int) -> list[str]:
    """The first n prompts, cycling when n exceeds the pool (batch 64 with --num-prompts 2)."""
    return [pool[i % len(pool)] for i in range(n)]


def parse_list(text: str, kind: type = int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---- heads and trees -------------------------------------------------------------------------

def heads_num_heads(heads: str) -> int:
    folder = Path(heads) if Path(heads).is_dir() else Path(heads).parent
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("medusa_num_heads", "num_heads"):
        if key in cfg:
            return int(cfg[key])
    raise ValueError(f"{folder}/config.json gives no head count")


def tree_paths(spec: Any, num_heads: int) -> list[list[int]]:
    """A preset name, chain-N, JSON text, JSON file or list -> paths in the plugin's order (each
    prefix is a valid tree), without the paths deeper than the heads reach."""
    from vllm_medusa.trees import MedusaTree, resolve_tree

    paths = [p for p in resolve_tree(spec, num_heads=64).paths if len(p) <= num_heads]
    MedusaTree.from_paths(paths, num_heads)
    return [list(p) for p in paths]


def base_tree(heads: str, tree: str | None) -> tuple[list[list[int]], str]:
    """The tree the truncations and the adaptive method start from: --tree, else the heads'
    calibrated tree.json, else mc_sim_7b_63. Returns the paths and where they came from."""
    n = heads_num_heads(heads)
    calibrated = Path(heads) / "tree.json"
    if tree is None and calibrated.is_file():
        return tree_paths(str(calibrated), n), "heads tree.json"
    return tree_paths(tree or DEFAULT_BASE_TREE, n), tree or DEFAULT_BASE_TREE


# ---- upstream chain Medusa needs the heads in vLLM's own layout -----------------------------------

def lm_head_weight(model: str):
    """The base model's output projection (the tied embedding for SmolLM2), read tensor by tensor."""
    import torch
    from safetensors import safe_open

    folder = Path(model)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        for f in files:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as fh:
                    if name in fh.keys():
                        return fh.get_tensor(name)
            else:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                if name in sd:
                    return sd[name]
    raise FileNotFoundError(f"no lm_head.weight or model.embed_tokens.weight in {folder}")


def local_model_dir(model: str) -> str:
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.bin"])


def vllm_medusa_heads(model: str, heads: str) -> str:
    """The heads converted for upstream `method="medusa"`, cached under .cache/bench/ by content."""
    import vllm_medusa.head_checkpoints
    import vllm_medusa.head_export
    import vllm_medusa.heads as heads_module
    from vllm_medusa.demo import cache_root

    folder = Path(heads)
    # The conversion's code: the heads module, the checkpoint reader and the writer.
    code = [Path(m.__file__).stat() for m in (heads_module, vllm_medusa.head_checkpoints, vllm_medusa.head_export)]
    stamp = [str(folder.resolve()), str(Path(model).resolve())] + [f"{c.st_size}:{c.st_mtime_ns}" for c in code]
    stamp += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir())]
    target = cache_root() / "bench" / ("vllm-medusa-" + hashlib.sha1("|".join(stamp).encode()).hexdigest()[:12])
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        heads_module.convert_to_vllm_medusa(folder, tmp, lm_head_weight(local_model_dir(model)))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@dataclass
class Method:
    """One engine configuration: `spec` goes to LLM(speculative_config=...) as it is."""

    name: str
    spec: dict | None
    nodes: int = 0  # draft tokens verified per step (the full tree; adaptive may use fewer)
    depth: int = 0  # deepest draft position that can be accepted
    note: str = ""
    error: str | None = None


LOOKUP_SUFFIXES = {"-nolookup": 0, "-lookup": 8}


def make_method(name: str, model: str, heads: str, base: list[list[int]], base_src: str,
                chain_heads: str | None = None) -> Method:
    """plain | medusa_chain (upstream, with ``chain_heads``, default ``heads``) | ngram | tree-N
    (base tree cut to N nodes) | tree-NAME (a preset or JSON file, whole) | adaptive (base tree,
    size chosen per step by the plugin); ``-lookup`` / ``-nolookup`` after a medusa_tree method
    turn its prompt-lookup branch on (8 tokens) / off (the plugin's default: off)."""
    for suffix, lookup in LOOKUP_SUFFIXES.items():
        if name.endswith(suffix) and (name.startswith("tree-") or name.startswith("adaptive")):
            method = make_method(name[: -len(suffix)], model, heads, base, base_src, chain_heads)
            return replace(method, name=name, spec={**method.spec, "lookup": lookup},
                           note=f"{method.note}, lookup branch {lookup or 'off'}")
    if name == "plain":
        return Method(name, None)
    if name == "ngram":
        k = NGRAM["num_speculative_tokens"]
        return Method(name, dict(NGRAM), k, k)
    if name == "medusa_chain":
        chain_heads = chain_heads or heads
        k = heads_num_heads(chain_heads)
        try:
            path = vllm_medusa_heads(model, chain_heads)
        except Exception as e:  # noqa: BLE001 - reported per method, the others still run
            return Method(name, None, k, k, error=f"conversion failed: {e!r}")
        note = "vLLM upstream chain Medusa" + ("" if chain_heads == heads else f", heads {Path(chain_heads).name}")
        return Method(name, {"method": "medusa", "model": path, "num_speculative_tokens": k}, k, k, note)
    k = heads_num_heads(heads)
    spec = {"method": "medusa_tree", "model": str(Path(heads).resolve())}
    if name == "adaptive":
        return Method(name, {**spec, "tree": base, "adaptive": True}, len(base), max(map(len, base)),
                      f"adaptive over {base_src}")
    if name.startswith("tree-"):
        arg = name[5:]
        if arg.isdigit():
            paths, note = base[: int(arg)], f"{base_src}[:{arg}]"
        else:
            paths, note = tree_paths(arg, k), arg
        return Method(name, {**spec, "tree": paths, "adaptive": False}, len(paths), max(map(len, paths)), note)
    raise ValueError(f"unknown method {name!r}")


# ---- output ------------------------------------------------------------------------------------

def results_dir(out: str | None, name: str | None) -> Path:
    path = Path(out) if out else BENCH / "results" / (name or time.strftime("%Y%m%d-%H%M%S"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)) + "\n")


def copy_latest(files: Sequence[Path], latest: str | None) -> None:
    """Copy the small, committable outputs to bench/latest/ (or wherever --latest points)."""
    if not latest:
        return
    dst = Path(latest)
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"

