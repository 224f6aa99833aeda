"""Options, CLI flags and bad input: clear errors that name the problem, before any engine starts."""

from __future__ import annotations

import argparse
import json

import pytest

from vllm_medusa.config import MedusaConfigError, MedusaOptions, parse_speculative_model
from vllm_medusa.registration import _fold_cli_args


def test_speculative_model_flag(tmp_path):
    cfg = parse_speculative_model(f"medusa:{tmp_path}?tree=small&acceptance=typical&posterior_alpha=0.2")
    assert cfg == {"method": "medusa_tree", "model": str(tmp_path), "tree": "small",
                   "acceptance": "typical", "posterior_alpha": 0.2}
    assert parse_speculative_model(f"medusa:{tmp_path}", tree="chain-2")["tree"] == "chain-2"
    with pytest.raises(MedusaConfigError, match="medusa:HEADS_DIR"):
        parse_speculative_model(str(tmp_path))
    with pytest.raises(MedusaConfigError, match="must be a number"):
        parse_speculative_model(f"medusa:{tmp_path}?posterior_alpha=high")


@pytest.mark.parametrize("raw,msg", [
    ({}, "needs 'model'"),
    ({"model": "/nonexistent/heads"}, "not found"),
    ({"acceptance": "greedy"}, "acceptance must be"),
    ({"num_speculative_tokens": 0}, "1..63"),
    ({"posterior_threshold": 2}, "posterior_threshold"),
    ({"bogus": 1}, "unknown medusa_tree option"),
])
def test_bad_options_name_the_problem(tmp_path, raw, msg):
    raw = {"model": str(tmp_path), **raw} if "model" not in raw and raw != {} else raw
    with pytest.raises(MedusaConfigError, match=msg):
        MedusaOptions.from_dict(raw)


def test_cli_flags_fold_into_speculative_config(tmp_path):
    args = argparse.Namespace(speculative_model=f"medusa:{tmp_path}", medusa_tree="small",
                              speculative_config=None)
    _fold_cli_args(args)
    assert args.speculative_config["method"] == "medusa_tree"
    assert args.speculative_config["tree"] == "small"
    both = argparse.Namespace(speculative_model=f"medusa:{tmp_path}", medusa_tree=None,
                              speculative_config={"method": "ngram"})
    with pytest.raises(MedusaConfigError, match="mutually exclusive"):
        _fold_cli_args(both)


def test_engine_args_translation(demo_model, demo_heads):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(demo_model), speculative_config={
        "method": "medusa_tree", "model": str(demo_heads), "tree": "chain-2"})
    config = args.create_engine_config()
    assert config.speculative_config.method == "custom_class"
    assert config.speculative_config.num_speculative_tokens == 2
    assert config.parallel_config.worker_cls.startswith("vllm_medusa.")
    assert config.additional_config["medusa_tree"]["tree"] == "chain-2"
    assert config.scheduler_config.scheduler_cls == "vllm_medusa.scheduler.MedusaScheduler"
    from vllm.v1.executor.abstract import Executor

    from vllm_medusa.executor import MedusaMultiprocExecutor

    assert Executor.get_class(config) is MedusaMultiprocExecutor  # on this CPU vLLM runs "mp"


@pytest.mark.parametrize("problem", ["wrong_hidden", "deep_tree", "garbage"])
def test_bad_heads_fail_before_the_engine_starts(demo_model, demo_heads, tmp_path, problem):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_medusa.heads import MedusaHeads, MedusaHeadsError, save_medusa_heads
    from vllm_medusa.trees import TreeError

    heads_dir, tree, error, msg = tmp_path / "heads", None, MedusaHeadsError, None
    if problem == "wrong_hidden":
        save_medusa_heads(MedusaHeads(2, 1, 64, 49152), heads_dir, "other-model")
        msg = "hidden size 64"
    elif problem == "deep_tree":
        heads_dir = demo_heads
        tree, error, msg = json.dumps([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0],
                                       [0, 0, 0, 0, 0, 0]]), TreeError, "Medusa heads"
    else:
        heads_dir.mkdir()
        (heads_dir / "config.json").write_text("{}")
        (heads_dir / "medusa_lm_head.safetensors").write_bytes(b"not a tensor file")
    args = EngineArgs(model=str(demo_model), speculative_config={
        "method": "medusa_tree", "model": str(heads_dir), "tree": tree})
    with pytest.raises(error, match=msg):
        args.create_engine_config()


# --------------------------------------------------------------------------- heads by hub id

HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, demo_heads, monkeypatch):
    """An offline Hugging Face Hub cache holding a copy of the demo heads as repo org/heads
    (branch main and tag v1 -> one snapshot)."""
    import shutil

    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    repo = cache / "models--org--heads"
    snapshot = repo / "snapshots" / HASH
    shutil.copytree(demo_heads, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HASH)
    (repo / "refs" / "v1").write_text(HASH)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return snapshot


def test_heads_by_repo_id_from_the_hub_cache(hub_cache):
    from vllm_medusa.config import resolve_heads

    assert resolve_heads("org/heads") == str(hub_cache)
    assert resolve_heads(f"org/heads@{HASH}") == str(hub_cache)
    assert resolve_heads("org/heads@v1") == str(hub_cache)


def test_unresolvable_repo_id_is_named(hub_cache):
    from vllm_medusa.config import resolve_heads

    with pytest.raises(MedusaConfigError, match="'org/missing'.*could not be resolved"):
        resolve_heads("org/missing")
    with pytest.raises(MedusaConfigError, match="'org/heads' at revision 'v2'"):
        resolve_heads("org/heads@v2")


def test_existing_local_path_wins_over_the_hub(hub_cache, tmp_path, monkeypatch):
    from vllm_medusa.config import resolve_heads

    local = tmp_path / "work" / "org" / "heads"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_heads("org/heads") == str(local)
    for path in ("./org/nothing", "/no/such/heads", "~/no-such-heads", "a/b/c"):
        with pytest.raises(MedusaConfigError, match="not found"):
            resolve_heads(path)


def test_hub_env_is_honoured_in_a_fresh_process(hub_cache):
    """HF_HUB_CACHE / HF_HUB_OFFLINE from the environment alone (no monkeypatched constants)."""
    import os
    import subprocess
    import sys

    code = "from vllm_medusa.config import resolve_heads; print(resolve_heads('org/heads'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), check=True).stdout
    assert out.strip() == str(hub_cache)


def test_engine_config_with_heads_by_repo_id(demo_model, hub_cache):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(demo_model), speculative_config={
        "method": "medusa_tree", "model": "org/heads", "tree": "chain-2"})
    config = args.create_engine_config()
    assert config.additional_config["medusa_tree"]["heads"] == str(hub_cache)


@pytest.mark.parametrize("flags", [
    ["--speculative-model", "medusa:org/heads?tree=chain-2"],
    ["--spec-model", "medusa:org/heads?tree=chain-2"],
    ["--spec-method", "medusa_tree", "--spec-model", "org/heads", "--spec-tokens", "2"],
])
def test_cli_flags_with_heads_by_repo_id(demo_model, hub_cache, flags):
    """Through vLLM's own parser: the plugin's flag and vLLM's --spec-* shorthands alike."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_medusa.compat import resolve
    from vllm_medusa.registration import register

    register()
    parser = EngineArgs.add_cli_args(resolve("FlexibleArgumentParser")())
    args = parser.parse_args(["--model", str(demo_model), *flags])
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.speculative_config.method == "custom_class"
    assert config.speculative_config.num_speculative_tokens == 2
    assert config.additional_config["medusa_tree"]["heads"] == str(hub_cache)


# --------------------------------------------------------------------------- --spec-* shorthands


def _spec_args(**kw):
    base = dict(speculative_config=None, spec_method=None, spec_model=None, spec_tokens=None)
    return argparse.Namespace(**{**base, **kw})


def test_spec_flags_fold_before_translation(tmp_path):
    from vllm_medusa.registration import fold_spec_flags

    args = _spec_args(spec_method="medusa_tree", spec_model=str(tmp_path), spec_tokens=3)
    fold_spec_flags(args)
    assert args.speculative_config == {"method": "medusa_tree", "model": str(tmp_path),
                                       "num_speculative_tokens": 3}
    assert args.spec_method is args.spec_model is args.spec_tokens is None  # vLLM won't fold again
    args = _spec_args(spec_model=f"medusa:{tmp_path}?tree=small")
    fold_spec_flags(args)
    assert args.speculative_config == {"method": "medusa_tree", "model": str(tmp_path), "tree": "small"}
    args = _spec_args(speculative_config={"method": "medusa_tree", "tree": "small"},
                      spec_model=str(tmp_path))
    fold_spec_flags(args)
    assert args.speculative_config == {"method": "medusa_tree", "tree": "small", "model": str(tmp_path)}


def test_spec_flags_for_other_methods_are_left_to_vllm():
    from vllm_medusa.registration import fold_spec_flags

    args = _spec_args(spec_method="ngram", spec_tokens=3)
    fold_spec_flags(args)
    assert args.speculative_config is None and args.spec_method == "ngram" and args.spec_tokens == 3


def test_spec_flag_conflicts_are_named(tmp_path):
    from vllm_medusa.registration import fold_spec_flags

    with pytest.raises(MedusaConfigError, match=r"--spec-model and --speculative-config\['model'\]"):
        fold_spec_flags(_spec_args(speculative_config={"method": "medusa_tree", "model": "x"},
                                   spec_model=str(tmp_path)))
    with pytest.raises(MedusaConfigError, match="--spec-method is 'ngram'"):
        fold_spec_flags(_spec_args(spec_method="ngram", spec_model=f"medusa:{tmp_path}"))


# --------------------------------------------------------------------------- CUDA graphs on GPU


@pytest.fixture
def on_gpu_platform(monkeypatch):
    """The registration's view of a CUDA platform (nothing here touches a device)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)


def test_gpu_engines_are_compiled_with_piecewise_graphs(demo_model, demo_heads, on_gpu_platform):
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_medusa.registration import GPU_WORKER_CLASS, translate_engine_args

    args = EngineArgs(model=str(demo_model), speculative_config={
        "method": "medusa_tree", "model": str(demo_heads), "tree": "chain-2"})
    translate_engine_args(args)
    assert not args.enforce_eager  # not forced eager any more
    assert args.worker_cls == GPU_WORKER_CLASS
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    eager = EngineArgs(model=str(demo_model), enforce_eager=True, speculative_config={
        "method": "medusa_tree", "model": str(demo_heads), "tree": "chain-2"})
    translate_engine_args(eager)
    assert eager.enforce_eager and eager.compilation_config.cudagraph_mode is None


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "full_decode_only"])
def test_full_cuda_graphs_are_refused(demo_model, demo_heads, on_gpu_platform, mode):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_medusa.registration import translate_engine_args

    args = EngineArgs(model=str(demo_model), compilation_config={"cudagraph_mode": mode},
                      speculative_config={"method": "medusa_tree", "model": str(demo_heads),
                                          "tree": "chain-2"})
    with pytest.raises(MedusaConfigError, match="full CUDA graph replays attention"):
        translate_engine_args(args)


def test_resolved_cuda_graph_settings_are_checked(on_gpu_platform):
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    from vllm_medusa.registration import check_cuda_graphs

    def config(mode, splits_attention=True):
        cc = SimpleNamespace(cudagraph_mode=mode, splitting_ops_contain_attention=lambda: splits_attention)
        return SimpleNamespace(additional_config={"medusa_tree": {}}, compilation_config=cc)

    check_cuda_graphs(config(CUDAGraphMode.PIECEWISE))
    check_cuda_graphs(config(CUDAGraphMode.NONE, splits_attention=False))
    with pytest.raises(MedusaConfigError, match="splitting_ops"):
        check_cuda_graphs(config(CUDAGraphMode.PIECEWISE, splits_attention=False))
    with pytest.raises(MedusaConfigError, match="FULL_AND_PIECEWISE"):
        check_cuda_graphs(config(CUDAGraphMode.FULL_AND_PIECEWISE))
    check_cuda_graphs(SimpleNamespace(additional_config={}, compilation_config=None))  # not ours


def test_min_p_and_logit_bias_are_taken_by_medusa_tree_only():
    """vLLM's front end refuses min_p / logit_bias for speculative engines; the plugin lifts that
    for medusa_tree engines (their runner applies both) and keeps it for every other method."""
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_medusa.registration import PROPOSER_CLASS, register

    register()
    medusa = SimpleNamespace(method="custom_class", model=PROPOSER_CLASS)
    others = [SimpleNamespace(method="ngram", model="ngram"),
              SimpleNamespace(method="custom_class", model="my.Proposer")]
    for params in (SamplingParams(min_p=0.1), SamplingParams(logit_bias={13: -100.0})):
        params._validate_spec_decode(medusa)
        params._validate_spec_decode(None)
        for spec in others:
            with pytest.raises(VLLMValidationError, match="min_p and logit_bias"):
                params._validate_spec_decode(spec)


def test_pipeline_parallelism_is_refused(tiny_model, tmp_path):
    """Pipeline stages split the step the runner drafts in: refused with a message that says what to
    use instead; tensor parallelism is accepted (tests/test_tensor_parallel.py runs it)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_medusa.heads import MedusaHeads, save_medusa_heads

    heads = save_medusa_heads(MedusaHeads(2, 1, 128, 49152), tmp_path / "heads", str(tiny_model))
    spec = {"method": "medusa_tree", "model": str(heads)}
    with pytest.raises(MedusaConfigError, match="pipeline_parallel_size=2.*tensor_parallel_size"):
        EngineArgs(model=str(tiny_model), max_model_len=512, pipeline_parallel_size=2,
                   speculative_config=dict(spec)).create_engine_config()
    config = EngineArgs(model=str(tiny_model), max_model_len=512, tensor_parallel_size=2,
                        speculative_config=dict(spec)).create_engine_config()
    assert config.parallel_config.tensor_parallel_size == 2
