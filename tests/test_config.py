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
