"""`vllm-medusa serve MODEL --speculative-model medusa:HEADS`: the OpenAI server with tree
speculation answers, survives a bad request, and exports speculative-decoding metrics."""

from __future__ import annotations

import urllib.error

import pytest

from tests.server import PARIS_QUESTION, get_text, post, running_server

pytestmark = pytest.mark.engine


@pytest.mark.timeout(600)
def test_server_with_medusa_tree(demo_model, demo_heads):
    args = [str(demo_model), "--enforce-eager", "--max-model-len", "1024", "--served-model-name",
            "demo", "--speculative-model", f"medusa:{demo_heads}?adaptive=false", "--medusa-tree", "small"]
    with running_server(args) as base:
        body = {"model": "demo", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 24, "temperature": 0}
        first = post(f"{base}/v1/completions", body)
        assert first["usage"]["completion_tokens"] == 24
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(f"{base}/v1/completions", {**body, "max_tokens": -3})
        assert bad.value.code == 400
        chat = post(f"{base}/v1/chat/completions", {
            "model": "demo", "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": PARIS_QUESTION}]})
        assert "Paris" in chat["choices"][0]["message"]["content"]
        assert post(f"{base}/v1/completions", body)["choices"][0]["text"] == first["choices"][0]["text"]
        metrics = get_text(f"{base}/metrics")
        drafts = [line for line in metrics.splitlines()
                  if line.startswith("vllm:spec_decode_num_drafts_total")]
        assert drafts and float(drafts[0].split()[-1]) > 0
