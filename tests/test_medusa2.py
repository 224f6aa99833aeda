"""Medusa-2 recipe on the tiny random Llama: the joint loss, merging, resuming, and the whole
``train all --recipe medusa-2`` run served back through the plugin (one engine)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_training import synthetic_records
from vllm_medusa.demo import tiny_model_path
from vllm_medusa.heads import MedusaHeads, load_medusa_heads
from vllm_medusa.train.features import load_backbone
from vllm_medusa.train.medusa2 import (Medusa2Config, joint_losses, lora_model, save_medusa2,
                                       train_medusa2)

pytest.importorskip("peft")

NUM_HEADS = 3


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_path()


def _heads(model) -> MedusaHeads:
    vocab, hidden = model.get_output_embeddings().weight.shape
    heads = MedusaHeads(NUM_HEADS, 1, hidden, vocab, dtype=torch.float32)
    torch.nn.init.normal_(heads.block_weight, std=0.02)
    return heads


def _randomize_lora(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_kl_is_zero_at_init_and_heads_loss_reaches_the_backbone(tiny):
    """LoRA starts with B = 0: the tuned model is the original, so the KL term is 0; the heads'
    loss alone already has a gradient on the adapters (that is what makes it Medusa-2)."""
    _, base = load_backbone(tiny, torch.float32)
    model = lora_model(base, Medusa2Config(lora_rank=4))
    heads = _heads(base)
    kl, head_loss, accs = joint_losses(model, heads, synthetic_records(4), Medusa2Config())
    assert abs(float(kl.detach())) < 1e-6 and float(head_loss.detach()) > 0 and len(accs) == NUM_HEADS
    head_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_B" in n)  # A has none while B = 0
    _randomize_lora(model)
    kl, _, _ = joint_losses(model, heads, synthetic_records(4), Medusa2Config())
    assert float(kl.detach()) > 1e-4


def test_merging_preserves_the_forward(tiny):
    _, base = load_backbone(tiny, torch.float32)
    model = lora_model(base, Medusa2Config(lora_rank=4))
    _randomize_lora(model)
    ids = torch.tensor([synthetic_records(1)[0]["prompt_token_ids"] + [5, 6, 7]])
    with torch.no_grad():
        with model.disable_adapter():
            original = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert (adapted - original).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_joint_training_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    """Interrupted after the step-2 checkpoint, a rerun continues there and ends where an
    uninterrupted run ends."""
    import vllm_medusa.train.medusa2 as m2

    _, base = load_backbone(tiny, torch.float32)
    warm = tmp_path / "warm"
    from vllm_medusa.heads import save_medusa_heads

    save_medusa_heads(_heads(base), warm, "tiny", dtype=torch.float32)
    recs = synthetic_records(12)
    cfg = Medusa2Config(lora_rank=4, batch_tokens=160, checkpoint_every=2, lr_backbone=1e-3)
    _, want_heads, full = train_medusa2(tiny, recs, warm, tmp_path / "a", cfg, max_steps=4, progress=False)

    real, calls = m2.joint_losses, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(m2, "joint_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_medusa2(tiny, recs, warm, tmp_path / "b", cfg, max_steps=4, progress=False)
    monkeypatch.setattr(m2, "joint_losses", real)
    _, heads, resumed = train_medusa2(tiny, recs, warm, tmp_path / "b", cfg, max_steps=4, progress=False)
    assert resumed.resumed_at == 2 and resumed.steps == full.steps == 4
    assert [h["kl"] for h in resumed.history] == pytest.approx([h["kl"] for h in full.history], rel=1e-4, abs=1e-7)
    torch.testing.assert_close(heads.block_weight, want_heads.block_weight, atol=1e-5, rtol=1e-4)
    with pytest.raises(SystemExit, match="other data or settings"):
        train_medusa2(tiny, recs[:6], warm, tmp_path / "b", cfg, max_steps=4, progress=False)


def test_bad_input_is_named(tiny, tmp_path):
    from vllm_medusa.train.__main__ import run

    with pytest.raises(SystemExit, match="not a local HF checkpoint"):
        run(["all", "--model", str(tmp_path / "nope"), "--recipe", "medusa-2"])
    _, base = load_backbone(tiny, torch.float32)
    with pytest.raises(ValueError, match="none of the LoRA target modules"):
        lora_model(base, Medusa2Config(lora_targets=("c_attn",)))
    with pytest.raises(SystemExit, match="not a Medusa-2 output folder"):
        run(["compare", "--model", str(tiny), "--tuned", str(tiny)])


def _seed_answers(path, prompts, length: int) -> None:
    """Answers for the given prompt ids, so the stages that would start an engine find them done."""
    recs = []
    for i, p in enumerate(prompts):
        pattern = [200 + i % 7, 300 + i % 5, 400 + i % 3]
        recs.append({"id": p.id, "prompt_token_ids": p.token_ids,
                     "output_token_ids": [pattern[j % 3] for j in range(length)], "finish_reason": "length"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_recipe_output_serves_through_the_plugin(tiny, tmp_path):
    """``train all --recipe medusa-2`` writes one folder that vLLM loads as the model and the plugin
    as its heads; greedy output of that engine equals plain greedy decoding of the merged model."""
    from transformers import AutoTokenizer

    from vllm_medusa.train.__main__ import run
    from vllm_medusa.train.compare import tuned_work_dir
    from vllm_medusa.train.distill import mtbench_prompts, sharegpt_prompts

    work, out = tmp_path / "work", tmp_path / "m2"
    tok = AutoTokenizer.from_pretrained(str(tiny))
    _seed_answers(work / "distill.jsonl", sharegpt_prompts(tok, 10, 512), 24)
    _seed_answers(tuned_work_dir(work, out) / "mtbench-answers.jsonl", mtbench_prompts(tok), 8)
    assert run(["all", "--model", "tiny", "--work-dir", str(work), "--out", str(out), "--recipe", "medusa-2",
                "--num-samples", "10", "--max-tokens", "24", "--heads", str(NUM_HEADS), "--max-steps", "10",
                "--lr", "3e-3", "--batch-size", "64", "--softmax-vocab", "data", "--joint-max-steps", "3",
                "--joint-batch-tokens", "512", "--lr-backbone", "1e-3", "--eval-max-tokens", "8"]) == 0
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "medusa_lm_head.safetensors",
            "tokenizer.json", "tree.json", "medusa2.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "medusa2.json").read_text())
    assert summary["training"]["steps"] == 3 and summary["evaluation"]["tree"]

    _, merged = load_backbone(out, torch.float32)
    _, original = load_backbone(tiny, torch.float32)
    assert any((a - b).abs().max() > 0 for a, b in zip(merged.parameters(), original.parameters()))
    vocab, hidden = merged.get_output_embeddings().weight.shape
    heads = load_medusa_heads(out, hidden_size=hidden, vocab_size=vocab, dtype=torch.float32)
    assert heads.num_heads == NUM_HEADS and heads.token_map is not None  # the draft vocabulary survives

    from vllm import LLM, SamplingParams

    from tests.conftest import shutdown_llm

    prompts = [r["prompt_token_ids"] for r in synthetic_records(3, seed=5)]
    llm = LLM(model=str(out), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              speculative_config={"method": "medusa_tree", "model": str(out)})
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    for p, o in zip(prompts, outs):
        ref = merged.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):]
        got = list(o.outputs[0].token_ids)
        assert got == ref.tolist()[: len(got)] and len(got) > 0


def test_comparison_numbers(tiny):
    from vllm_medusa.train.compare import greedy_agreement, teacher_forced_quality

    recs = synthetic_records(3)
    same = teacher_forced_quality(tiny, tiny, recs)
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6) and same["argmax_agreement"] == 1.0
    assert same["tokens"] == sum(len(r["output_token_ids"]) for r in recs)
    a = [{"id": "x", "output_token_ids": [1, 2, 3, 4]}, {"id": "y", "output_token_ids": [5, 6]}]
    b = [{"id": "x", "output_token_ids": [1, 2, 9, 4]}, {"id": "y", "output_token_ids": [5, 6]},
         {"id": "z", "output_token_ids": [7]}]
    got = greedy_agreement(a, b)
    assert got == {"answers": 2, "identical_answers": 0.5, "prefix_share": 4 / 6, "positionwise_share": 5 / 6}
