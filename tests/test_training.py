"""Training pipeline on the tiny random Llama with synthetic answers (no engine except one marked test)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vllm_medusa.demo import tiny_model_path
from vllm_medusa.heads import convert_to_vllm_medusa, load_medusa_heads, save_medusa_heads
from vllm_medusa.train.features import IGNORE, extract_features, load_backbone, load_features
from vllm_medusa.train.metrics import MISS, cumulative, rank_accuracies, simulated_acceptance
from vllm_medusa.train.trainer import TrainConfig, medusa_loss, soft_medusa_loss, teacher_rows, train_heads

NUM_HEADS = 3


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_path()


def synthetic_records(n: int = 12, seed: int = 0) -> list[dict]:
    """Prompts of random tokens, answers that cycle through a short per-record pattern: the future
    is predictable from the present, so heads can learn it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    recs = []
    for i in range(n):
        prompt = torch.randint(100, 40000, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        pattern = torch.randint(100, 400, (3,), generator=g).tolist()
        length = int(torch.randint(20, 40, (1,), generator=g))
        recs.append({"id": f"syn-{i}", "prompt_token_ids": prompt,
                     "output_token_ids": [pattern[j % 3] for j in range(length)], "finish_reason": "length"})
    return recs


@pytest.fixture(scope="module")
def features_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    return extract_features(tiny, data, d / "features", dtype=torch.float32, shard_size=5)


def test_features_align_with_a_direct_forward(tiny, features_dir):
    feats = load_features(features_dir)
    recs = synthetic_records()
    assert feats.ids == [r["id"] for r in recs]
    assert feats.lengths.tolist() == [len(r["output_token_ids"]) for r in recs]
    decoder, model = load_backbone(tiny, torch.float32)
    rec = recs[7]
    ids = torch.tensor([rec["prompt_token_ids"] + rec["output_token_ids"]])
    with torch.inference_mode():
        full = decoder(input_ids=ids).last_hidden_state[0]
        logits = model(input_ids=ids).logits[0]
    p, m = len(rec["prompt_token_ids"]), len(rec["output_token_ids"])
    start = int(feats.record_starts[7])
    torch.testing.assert_close(feats.hidden[start:start + m], full[p - 1:p - 1 + m], atol=1e-4, rtol=1e-4)
    # Row j feeds the base lm_head for answer token j: the cached lm_head must reproduce the logits.
    torch.testing.assert_close(feats.hidden[start:start + m] @ feats.lm_head.T, logits[p - 1:p - 1 + m],
                               atol=1e-3, rtol=1e-3)
    targets = feats.targets(NUM_HEADS)[start:start + m]
    out = rec["output_token_ids"]
    for k in range(NUM_HEADS):
        assert targets[: m - 1 - k, k].tolist() == out[1 + k:]
        assert (targets[m - 1 - k:, k] == IGNORE).all()


@pytest.mark.parametrize("softmax_vocab", ["full", "data"])
def test_training_lowers_the_loss(features_dir, softmax_vocab):
    cfg = TrainConfig(num_heads=NUM_HEADS, num_layers=1, lr=3e-3, epochs=100, batch_size=64,
                      heldout_fraction=0.2, compute_dtype="float32", softmax_vocab=softmax_vocab)
    result = train_heads(features_dir, cfg, max_steps=40, progress=False)
    h = result.loss_history
    assert len(h) == 40 and all(map(torch.isfinite, torch.tensor(h)))
    assert sum(h[-5:]) / 5 < 0.8 * sum(h[:5]) / 5
    assert result.heldout_positions > 0 and len(result.heldout_accuracies) == NUM_HEADS
    token_map = result.heads.token_map
    if softmax_vocab == "full":
        assert token_map is None
    else:  # the heads keep the vocabulary they were trained on, and draft only from it
        assert token_map is not None and 0 < token_map.numel() == result.softmax_size
        assert bool((token_map[1:] > token_map[:-1]).all())


def test_token_conditioned_training(tiny, features_dir, tmp_path):
    """Heads that also see the produced token's input embedding train, save and reload."""
    feats = load_features(features_dir)
    _, model = load_backbone(tiny, torch.float32)
    rows = torch.arange(8)
    torch.testing.assert_close(feats.token_embeds(rows),
                               model.get_input_embeddings().weight[feats.tokens[rows].long()])
    cfg = TrainConfig(num_heads=NUM_HEADS, num_layers=1, lr=3e-3, epochs=100, batch_size=64,
                      heldout_fraction=0.2, compute_dtype="float32", token_conditioned=True)
    result = train_heads(feats, cfg, max_steps=40, progress=False)
    h = result.loss_history
    assert sum(h[-5:]) / 5 < 0.8 * sum(h[:5]) / 5
    heads = result.heads
    assert heads.token_conditioned and heads.token_weight.abs().sum() > 0
    vocab, hidden = feats.lm_head.shape
    with torch.no_grad():
        want = heads(feats.hidden[rows], feats.lm_head, token_embeds=feats.token_embeds(rows))
    save_medusa_heads(heads, tmp_path / "tc", "tiny", dtype=torch.float32)
    again = load_medusa_heads(tmp_path / "tc", hidden_size=hidden, vocab_size=vocab, dtype=torch.float32)
    torch.testing.assert_close(again(feats.hidden[rows], feats.lm_head,
                                     token_embeds=feats.token_embeds(rows)), want)
    feats.embed_tokens = None  # a cache from before token conditioning
    with pytest.raises(ValueError, match="rerun the features stage"):
        train_heads(feats, cfg, max_steps=1, progress=False)


def test_draft_vocab_keeps_the_most_frequent_tokens(features_dir):
    from vllm_medusa.train.trainer import most_frequent

    tokens = torch.tensor([5, 7, 7, 9, 9, 9, 3])
    assert most_frequent(tokens, torch.tensor([3, 5, 7, 9]), 2).tolist() == [7, 9]
    assert most_frequent(tokens, torch.tensor([3, 5, 7, 9]), None).tolist() == [3, 5, 7, 9]
    cfg = TrainConfig(num_heads=NUM_HEADS, lr=3e-3, batch_size=64, compute_dtype="float32",
                      softmax_vocab="data", draft_vocab=10)
    result = train_heads(features_dir, cfg, max_steps=2, progress=False)
    assert result.heads.token_map.numel() == 10 and result.softmax_size > 10
    with pytest.raises(ValueError, match="draft_vocab needs softmax_vocab='data'"):
        train_heads(features_dir, TrainConfig(draft_vocab=10), max_steps=1, progress=False)


def test_softmax_size_trains_over_the_most_frequent_tokens_only(features_dir):
    """A capped training softmax: its size is as asked, the heads' draft vocabulary is among its
    tokens, training on targets outside it stays finite, and impossible sizes are refused by name."""
    from vllm_medusa.train.trainer import most_frequent

    feats = load_features(features_dir)
    cfg = TrainConfig(num_heads=NUM_HEADS, lr=3e-3, batch_size=64, compute_dtype="float32",
                      softmax_vocab="data", softmax_size=12, draft_vocab=10)
    result = train_heads(feats, cfg, max_steps=3, progress=False)
    assert result.softmax_size == 12
    tokens = feats.tokens.long()
    top12 = most_frequent(tokens, tokens.unique(), 12)
    assert set(result.heads.token_map.tolist()) <= set(top12.tolist())
    assert all(math.isfinite(v) for v in result.loss_history)
    for bad in (dict(softmax_size=5), dict(softmax_size=8, draft_vocab=10),
                dict(softmax_size=12, softmax_vocab="full")):
        kw = dict(softmax_vocab="data", draft_vocab=None) | bad
        with pytest.raises(ValueError, match="softmax_size needs"):
            train_heads(feats, TrainConfig(compute_dtype="float32", **kw), max_steps=1, progress=False)


def test_heads_start_as_identity(features_dir):
    """Zero-initialised blocks: before training every head reproduces the base model's logits."""
    from vllm_medusa.heads import MedusaHeads

    feats = load_features(features_dir)
    heads = MedusaHeads(2, 1, feats.hidden.shape[1], feats.lm_head.shape[0], dtype=torch.float32)
    heads.zero_blocks()
    x = feats.hidden[:5]
    base = x @ feats.lm_head.T
    torch.testing.assert_close(heads(x, feats.lm_head), torch.stack([base, base]))


def test_saved_heads_reload_with_same_logits_and_convert(features_dir, tmp_path):
    cfg = TrainConfig(num_heads=NUM_HEADS, lr=3e-3, batch_size=64, compute_dtype="float32")
    heads = train_heads(features_dir, cfg, max_steps=5, progress=False).heads
    feats = load_features(features_dir)
    vocab, hidden = feats.lm_head.shape
    x = feats.hidden[:8]
    with torch.no_grad():
        want = heads(x, feats.lm_head)
    save_medusa_heads(heads, tmp_path / "fp32", "tiny", dtype=torch.float32)
    again = load_medusa_heads(tmp_path / "fp32", hidden_size=hidden, vocab_size=vocab, dtype=torch.float32)
    torch.testing.assert_close(again(x, feats.lm_head), want)
    save_medusa_heads(heads, tmp_path / "bf16", "tiny")
    bf16 = load_medusa_heads(tmp_path / "bf16", hidden_size=hidden, vocab_size=vocab, dtype=torch.float32)
    torch.testing.assert_close(bf16(x, feats.lm_head), want, atol=0.1, rtol=0.05)

    out = convert_to_vllm_medusa(tmp_path / "fp32", tmp_path / "vllm", feats.lm_head, dtype=torch.float32)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_type"] == "medusa" and cfg_json["num_heads"] == NUM_HEADS
    assert cfg_json["medusa_fc_bias"] is True and cfg_json["vocab_size"] == vocab
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_heads.2.weight").shape == (vocab, hidden)
    assert {f"lm_heads.{h}.weight" for h in range(NUM_HEADS)} <= keys
    assert {f"blocks.{h}.layers.0.bias" for h in range(NUM_HEADS)} <= keys
    converted = load_medusa_heads(out, hidden_size=hidden, vocab_size=vocab, dtype=torch.float32)
    torch.testing.assert_close(converted(x), want)


def test_loss_weights_and_accuracy():
    logits = torch.zeros(2, 3, 5)
    logits[0, :, 1] = 10.0
    logits[1, :, 2] = 10.0
    targets = torch.tensor([[1, 2], [1, 3], [4, IGNORE]])
    loss, accs = medusa_loss(logits, targets, head_decay=0.5)
    assert accs == pytest.approx([2 / 3, 1 / 2])
    ce = torch.nn.functional.cross_entropy
    want = ce(logits[0], targets[:, 0]) + 0.5 * ce(logits[1, :2], targets[:2, 1])
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_soft_loss_is_kl_to_the_teacher_plus_its_entropy():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    targets = torch.tensor([[1, 2], [3, 3], [0, IGNORE], [6, IGNORE]])
    loss, accs = soft_medusa_loss(logits, teacher, targets, head_decay=0.5)
    p, logq = teacher.softmax(-1), logits.log_softmax(-1)
    kl_plus_h = (p * (p.log() - logq)).sum(-1) - (p * p.log()).sum(-1)
    want = kl_plus_h[0].mean() + 0.5 * kl_plus_h[1, :2].mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert accs[1] == pytest.approx(float((logits[1, :2].argmax(-1) == targets[:2, 1]).float().mean()))
    changed = logits.clone()
    changed[1, 2:] = 100.0  # rows without a target do not count
    assert float(soft_medusa_loss(changed, teacher, targets, 0.5)[0]) == pytest.approx(float(loss), rel=1e-5)
    # A one-hot teacher is the hard loss.
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0).t(), 7).float() * 1e4
    hard = medusa_loss(logits, targets, 0.5)[0]
    assert float(soft_medusa_loss(logits, onehot, targets, 0.5)[0]) == pytest.approx(float(hard), rel=1e-4)


def test_soft_targets_move_the_heads_to_the_base_distribution(features_dir):
    """Head k at row j learns the base model's distribution at row j+1+k (the logits that produce
    answer token j+1+k): after training, the heads are closer to it in KL than at the start."""
    feats = load_features(features_dir)
    assert teacher_rows(torch.tensor([0, 5]), 2, 7).tolist() == [[1, 6], [2, 6]]
    cfg = TrainConfig(num_heads=NUM_HEADS, num_layers=1, lr=3e-3, epochs=100, batch_size=64,
                      heldout_fraction=0.0, compute_dtype="float32", soft_targets=True)
    targets = feats.targets(NUM_HEADS)
    rows = (targets[:, 0] != IGNORE).nonzero().squeeze(1)

    def kl(heads=None):
        """Mean KL(base || heads); without heads, of the identity start (every head = base logits)."""
        with torch.no_grad():
            x = feats.hidden[rows]
            logq = (heads(x, feats.lm_head) if heads else (x @ feats.lm_head.T).expand(NUM_HEADS, -1, -1)).log_softmax(-1)
            logp = (feats.hidden[teacher_rows(rows, NUM_HEADS, len(feats.hidden))] @ feats.lm_head.T).log_softmax(-1)
            per = (logp.exp() * (logp - logq)).sum(-1)
            valid = targets[rows].t() != IGNORE
            return float((per * valid).sum() / valid.sum())

    result = train_heads(feats, cfg, max_steps=40, progress=False)
    assert kl(result.heads) < 0.8 * kl()


def test_rank_metrics_and_simulated_acceptance():
    ranks = torch.tensor([[0, 0, 1], [1, MISS, 0], [0, 2, IGNORE], [MISS, 0, 0]])
    acc = rank_accuracies(ranks, topk=3)
    assert acc[0] == pytest.approx([2 / 4, 1 / 4, 0])
    assert acc[2] == pytest.approx([2 / 3, 1 / 3, 0])
    assert cumulative(acc)[0] == pytest.approx([0.5, 0.75, 0.75])
    tree = [(0,), (1,), (0, 0), (0, 0, 0), (0, 2)]
    # row 0: (0,) (0,0) accepted, (0,0,1) not in tree -> 3; row 1: (1,) -> 2; row 2: (0,2) -> 3; row 3: 1
    assert simulated_acceptance(ranks, tree) == pytest.approx((3 + 2 + 3 + 1) / 4)
    # stepped, one answer of 4 rows: row 0 accepts 3 tokens -> next step at row 3 (1 token)
    assert simulated_acceptance(ranks, tree, [4]) == pytest.approx((3 + 1) / 2)
    # answers of 1 and 3 rows: row 0 is its own answer (one step); rows 1 then 3 -> 2 steps
    assert simulated_acceptance(ranks, tree, [1, 3]) == pytest.approx((3 + 2 + 1) / 3)


@pytest.mark.engine
def test_converted_heads_run_in_upstream_chain_medusa(tiny, features_dir, tmp_path):
    """Upstream vLLM 0.32 chain Medusa loads the converted checkpoint; greedy output is unchanged."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(num_heads=NUM_HEADS, lr=3e-3, batch_size=64, compute_dtype="float32",
                      softmax_vocab="data")
    heads = train_heads(features_dir, cfg, max_steps=20, progress=False).heads
    assert heads.token_map is not None  # upstream gets the full vocabulary (it cannot load a token_map)
    save_medusa_heads(heads, tmp_path / "heads", str(tiny))
    feats = load_features(features_dir)
    out = convert_to_vllm_medusa(tmp_path / "heads", tmp_path / "vllm", feats.lm_head, dtype=torch.float32)

    from vllm import LLM, SamplingParams

    prompt = synthetic_records(1, seed=5)[0]["prompt_token_ids"]
    llm = LLM(model=str(tiny), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              speculative_config={"method": "medusa", "model": str(out), "num_speculative_tokens": NUM_HEADS})
    got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=24),
                       use_tqdm=False)[0].outputs[0].token_ids
    _, model = load_backbone(tiny, torch.float32)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    assert list(got) == ref.tolist()[: len(got)] and len(got) == 24


def test_features_resume_and_limit(tiny, tmp_path):
    """A longer run reuses the shards of a shorter (--limit) one, and finds them by record ids."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(7)))
    d = tmp_path / "features"
    extract_features(tiny, data, d, dtype=torch.float32, shard_size=3, limit=4)
    assert load_features(d).lengths.numel() == 4
    first = (d / "shard-00000.pt").stat().st_mtime_ns
    extract_features(tiny, data, d, dtype=torch.float32, shard_size=3)
    feats = load_features(d)
    assert feats.lengths.numel() == 7 and feats.ids == [f"syn-{i}" for i in range(7)]
    assert (d / "shard-00000.pt").stat().st_mtime_ns == first

    extract_features(tiny, data, d, dtype=torch.float32, shard_size=3, start=3)
    tail = load_features(d)
    assert tail.ids == feats.ids[3:]
    torch.testing.assert_close(tail.hidden, feats.hidden[int(feats.lengths[:3].sum()):])
    with pytest.raises(ValueError, match="multiple of shard_size"):
        extract_features(tiny, data, d, dtype=torch.float32, shard_size=3, start=2)


def test_training_continues_from_earlier_heads(features_dir, tmp_path):
    """--init-heads: training starts from the given heads' blocks (unchanged at lr 0) and goes on
    lowering the loss from there; heads of another shape are refused by name."""
    feats = load_features(features_dir)
    vocab, hidden = feats.lm_head.shape
    cfg = TrainConfig(num_heads=NUM_HEADS, lr=3e-3, batch_size=64, compute_dtype="float32", heldout_fraction=0.0)
    first = train_heads(feats.prefix(6), cfg, max_steps=20, progress=False)
    save_medusa_heads(first.heads, tmp_path / "first", "tiny", dtype=torch.float32)
    init = load_medusa_heads(tmp_path / "first", hidden_size=hidden, vocab_size=vocab, dtype=torch.float32)
    frozen = train_heads(feats, TrainConfig(**{**cfg.__dict__, "lr": 0.0}), max_steps=2, progress=False, init=init)
    torch.testing.assert_close(frozen.heads.block_weight, first.heads.block_weight)
    go_on = train_heads(feats, cfg, max_steps=20, progress=False, init=init)
    fresh = train_heads(feats, cfg, max_steps=20, progress=False)
    assert go_on.loss_history[0] < fresh.loss_history[0]
    assert go_on.final_train_loss < first.loss_history[0]
    with pytest.raises(ValueError, match="heads, layers"):
        train_heads(feats, TrainConfig(**{**cfg.__dict__, "num_heads": 2}), max_steps=1, progress=False, init=init)


def test_training_md_keeps_hand_written_notes(tmp_path):
    from vllm_medusa.train.report import write_training_md

    out = write_training_md(tmp_path, {"model_name": "m"})
    out.write_text(out.read_text() + "\n## Notes\n\n- measured by hand\n")
    text = write_training_md(tmp_path, {"model_name": "m"}).read_text()
    assert text.count("## Notes") == 1 and text.rstrip().endswith("- measured by hand")
    text = write_training_md(tmp_path, {"model_name": "m", "notes": ["from run.json"]}).read_text()
    assert "from run.json" not in text and "measured by hand" in text  # the folder's own notes win
    (tmp_path / "new").mkdir()
    text = write_training_md(tmp_path / "new", {"model_name": "m", "notes": ["from run.json"]}).read_text()
    assert "- from run.json" in text


def test_training_md_counts_later_turn_prompts(tmp_path):
    from vllm_medusa.train.distill import summarize
    from vllm_medusa.train.report import write_training_md

    recs = [{"id": i, "prompt_token_ids": [1, 2], "output_token_ids": [3], "finish_reason": "stop"}
            for i in ("sharegpt-3", "sharegpt-3-t1", "sharegpt-9-t2")]
    data = summarize(recs)
    assert (data["answers"], data["later_turns"], data["prompt_tokens"]) == (3, 2, 6)
    text = write_training_md(tmp_path, {"stages": {"distill": {"data": data}}}).read_text()
    assert "answers to 3 ShareGPT prompts (2 of them later turns" in text
    text = write_training_md(tmp_path, {"stages": {"distill": {"data": summarize(recs[:1])}}}).read_text()
    assert "answers to 1 ShareGPT prompts (first turns;" in text


def test_model_labels_are_the_backbones_greedy_tokens(tiny, tmp_path):
    """``labels="model"``: row j holds the backbone's argmax there (teacher-forced along the
    record's text), so head k at row j learns the model's token j+1+k, not the text's."""
    recs = synthetic_records(4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    feats = load_features(extract_features(tiny, data, tmp_path / "f", dtype=torch.float32, labels="model"))
    _, model = load_backbone(tiny, torch.float32)
    for i, rec in enumerate(recs):
        ids = torch.tensor([rec["prompt_token_ids"] + rec["output_token_ids"]])
        with torch.inference_mode():
            greedy = model(input_ids=ids).logits[0].argmax(-1)
        p, m = len(rec["prompt_token_ids"]), len(rec["output_token_ids"])
        start = int(feats.record_starts[i])
        assert feats.tokens[start:start + m].tolist() == greedy[p - 1:p - 1 + m].tolist()
    assert feats.tokens.tolist() != [t for r in recs for t in r["output_token_ids"]]
    with pytest.raises(ValueError, match="labels"):
        extract_features(tiny, data, tmp_path / "g", labels="text")


def test_sharegpt_text_records_answer_the_distill_prompts(tiny, tmp_path):
    """ShareGPT's own answers to the prompts self-distillation would answer (same ids, same
    prompt tokens), cut to max_tokens."""
    from transformers import AutoTokenizer

    from vllm_medusa.train.distill import read_records, sharegpt_prompts, sharegpt_text

    out = sharegpt_text(tiny, tmp_path / "text.jsonl", num_samples=6, max_tokens=32)
    recs = read_records(out)
    assert len(recs) == 6
    prompts = {p.id: p.token_ids for p in sharegpt_prompts(AutoTokenizer.from_pretrained(str(tiny)), 8, 512)}
    for r in recs:
        assert prompts[r["id"]] == r["prompt_token_ids"]
        assert 0 < len(r["output_token_ids"]) <= 32
    assert any(r["finish_reason"] == "length" for r in recs)


def test_archive_round_trip_restores_a_fresh_work_dir(tmp_path):
    """Complete chunks go into deterministic gzipped shards; a fresh work dir gets them back and keeps
    its own unarchived records; an archive of another run is refused."""
    from vllm_medusa.train.distill import archive_records, read_records, restore_records

    recs = synthetic_records(7)
    data = tmp_path / "work" / "distill.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    archive = tmp_path / "archive"
    shards = archive_records(data, archive, shard_records=3)
    assert [p.name for p in shards] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz"]
    first = shards[0].read_bytes()
    assert archive_records(data, archive, shard_records=3) == []
    assert shards[0].read_bytes() == first

    fresh = tmp_path / "fresh" / "distill.jsonl"
    assert restore_records(archive, fresh) == 6
    assert read_records(fresh) == recs[:6]
    assert restore_records(archive, fresh) == 0

    data.write_text("".join(json.dumps(r) + "\n" for r in recs[6:]))
    assert restore_records(archive, data) == 6
    assert read_records(data) == recs

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in recs[:3][::-1]))
    with pytest.raises(ValueError, match="part-00000"):
        archive_records(other, archive, shard_records=3)


def test_finished_run_archives_its_last_short_shard(tmp_path):
    """A finished run keeps every answer (the short tail too); a longer run later fills that shard."""
    from vllm_medusa.train.distill import archive_records, read_records, restore_records

    recs = synthetic_records(9)
    data = tmp_path / "distill.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs[:7]))
    archive = tmp_path / "archive"
    assert len(archive_records(data, archive, shard_records=3, final=True)) == 3
    fresh = tmp_path / "fresh.jsonl"
    assert restore_records(archive, fresh) == 7
    assert read_records(fresh) == recs[:7]
    assert archive_records(data, archive, shard_records=3, final=True) == []

    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [p.name for p in archive_records(data, archive, shard_records=3)] == ["part-00002.jsonl.gz"]
    fresh.unlink()
    assert restore_records(archive, fresh) == 9
    assert read_records(fresh) == recs

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in [*recs[:6], recs[8]]))
    with pytest.raises(ValueError, match="part-00002"):
        archive_records(other, archive, shard_records=3, final=True)


def test_later_turns_follow_all_first_turns_with_their_history(tiny):
    """First turns keep their ids and order (a resumed run extends the same list); second turns come
    next with the conversation so far; broken alternation and overlong prompts are skipped."""
    from transformers import AutoTokenizer

    from vllm_medusa.train.distill import _answer_turn, iter_sharegpt_prompts

    tok = AutoTokenizer.from_pretrained(str(tiny))

    def conv(*texts):
        return {"conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": t}
                                  for k, t in enumerate(texts)]}

    convs = [conv("a?", "A.", "b?", "B.", "c?"), conv("d?"), conv("a?", "A2.", "e?"),
             {"conversations": [{"from": "human", "value": "f?"}, {"from": "human", "value": "g?"},
                                {"from": "gpt", "value": "G."}]},
             conv("x " * 600, "y.", "z?")]
    prompts = list(iter_sharegpt_prompts(tok, convs, max_prompt_tokens=256))
    ids = [p.id for p in prompts]
    assert ids == ["sharegpt-0", "sharegpt-1", "sharegpt-3", "sharegpt-0-t1", "sharegpt-2-t1", "sharegpt-0-t2"]
    history = tok.apply_chat_template([{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."},
                                       {"role": "user", "content": "b?"}], tokenize=True, add_generation_prompt=True)
    if hasattr(history, "keys"):
        history = history["input_ids"]
    assert prompts[3].token_ids == list(history)
    assert _answer_turn("sharegpt-0") == (0, 1) and _answer_turn("sharegpt-12-t2") == (12, 5)
