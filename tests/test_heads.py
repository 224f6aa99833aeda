"""Every Medusa checkpoint layout loads to the same logits as a direct computation; bad ones fail loudly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vllm_medusa.heads import (
    MedusaHeads,
    MedusaHeadsError,
    convert_to_vllm_medusa,
    load_medusa_heads,
    save_medusa_heads,
)

H, V, K, L, B = 16, 50, 3, 2, 4


def make_weights(seed: int = 0, *, own_proj: bool = True, bias: bool = True, hidden: int = H,
                 vocab: int = V, heads: int = K, layers: int = L):
    g = torch.Generator().manual_seed(seed)
    blocks = [[(torch.randn(hidden, hidden, generator=g) * 0.2,
                torch.randn(hidden, generator=g) * 0.2 if bias else None)
               for _ in range(layers)] for _ in range(heads)]
    projs = [torch.randn(vocab, hidden, generator=g) for _ in range(heads)] if own_proj else None
    return blocks, projs


def reference_logits(hidden, blocks, projs, lm_head=None, proj_bias=None):
    """Head by head, layer by layer, the way FasterDecoding's ResBlock computes it."""
    out = []
    for h, head_blocks in enumerate(blocks):
        x = hidden
        for w, b in head_blocks:
            x = x + F.silu(F.linear(x, w, b))
        proj = projs[h] if projs is not None else lm_head
        out.append(F.linear(x, proj, None if proj_bias is None else proj_bias[h]))
    return torch.stack(out)


def fd_state_dict(blocks, projs):
    sd = {}
    for h, head_blocks in enumerate(blocks):
        for layer, (w, b) in enumerate(head_blocks):
            sd[f"{h}.{layer}.linear.weight"] = w
            if b is not None:
                sd[f"{h}.{layer}.linear.bias"] = b
        if projs is not None:
            sd[f"{h}.{len(head_blocks)}.weight"] = projs[h]
    return sd


def vllm_state_dict(blocks, projs):
    sd = {}
    for h, head_blocks in enumerate(blocks):
        for layer, (w, b) in enumerate(head_blocks):
            sd[f"blocks.{h}.layers.{layer}.weight"] = w
            if b is not None:
                sd[f"blocks.{h}.layers.{layer}.bias"] = b
        sd[f"lm_heads.{h}.weight"] = projs[h]
    return sd


def write_config(d, **cfg):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))


def load(path, **kw):
    kw.setdefault("hidden_size", H)
    kw.setdefault("vocab_size", V)
    return load_medusa_heads(path, dtype=torch.float32, **kw)


@pytest.fixture
def hidden():
    return torch.randn(B, H, generator=torch.Generator().manual_seed(123))


def test_fasterdecoding_pt(tmp_path, hidden):
    blocks, projs = make_weights()
    # The published 7B config under-reports the head count: counts must come from the tensors.
    write_config(tmp_path, medusa_num_heads=2, medusa_num_layers=L, base_model_name_or_path="x")
    torch.save(fd_state_dict(blocks, projs), tmp_path / "medusa_lm_head.pt")
    heads = load(tmp_path)
    assert (heads.num_heads, heads.num_layers, heads.shared_lm_head) == (K, L, False)
    torch.testing.assert_close(heads(hidden), reference_logits(hidden, blocks, projs))


def test_fasterdecoding_safetensors_as_file(tmp_path, hidden):
    blocks, projs = make_weights(1)
    save_file(fd_state_dict(blocks, projs), str(tmp_path / "medusa_lm_head.safetensors"))
    heads = load(tmp_path / "medusa_lm_head.safetensors")
    torch.testing.assert_close(heads(hidden), reference_logits(hidden, blocks, projs))


def test_shared_lm_head_v2(tmp_path, hidden):
    blocks, _ = make_weights(2, own_proj=False)
    lm_head = torch.randn(V, H)
    save_file(fd_state_dict(blocks, None), str(tmp_path / "medusa_lm_head.safetensors"))
    heads = load(tmp_path)
    assert heads.shared_lm_head and heads.proj_weight is None
    torch.testing.assert_close(heads(hidden, lm_head), reference_logits(hidden, blocks, None, lm_head))
    with pytest.raises(ValueError, match="lm_head_weight"):
        heads(hidden)


@pytest.mark.parametrize("bias", [True, False])
def test_vllm_medusa_model(tmp_path, hidden, bias):
    blocks, projs = make_weights(3, bias=bias)
    write_config(tmp_path, model_type="medusa", architectures=["MedusaModel"], hidden_size=H,
                 vocab_size=V, num_heads=K, num_hidden_layers=L, medusa_fc_bias=bias)
    save_file(vllm_state_dict(blocks, projs), str(tmp_path / "model.safetensors"))
    heads = load(tmp_path)
    assert (heads.block_bias is not None) == bias
    torch.testing.assert_close(heads(hidden), reference_logits(hidden, blocks, projs))


def test_vllm_original_lm_head_with_token_map(tmp_path, hidden):
    blocks, _ = make_weights(4)
    token_map = torch.tensor([3, 7, 11, 20, 42, 49, 0, 5])
    lm_head = torch.randn(V, H)
    sd = vllm_state_dict(blocks, [lm_head] * K)
    sd = {k: v for k, v in sd.items() if not k.startswith("lm_heads.")}
    sd["lm_heads.0.weight"] = lm_head  # upstream maps it onto the single lm_head and slices it
    sd["token_map"] = token_map
    write_config(tmp_path, model_type="medusa", hidden_size=H, vocab_size=V, num_heads=K,
                 num_hidden_layers=L, medusa_fc_bias=True, original_lm_head=True,
                 truncated_vocab_size=len(token_map))
    save_file(sd, str(tmp_path / "model.safetensors"))
    heads = load(tmp_path)
    assert heads.out_vocab_size == len(token_map) and heads.proj_weight.shape[0] == 1
    ref_full = reference_logits(hidden, blocks, None, lm_head)
    torch.testing.assert_close(heads(hidden), ref_full[..., token_map])
    ids = heads.topk_token_ids(hidden, 3)
    masked = torch.full_like(ref_full, float("-inf"))
    masked[..., token_map] = ref_full[..., token_map]
    torch.testing.assert_close(ids, masked.topk(3, dim=-1).indices)
    torch.testing.assert_close(heads.full_vocab_logits(heads(hidden)), masked)


def test_medusa2_bundle_sharded(tmp_path, hidden):
    blocks, projs = make_weights(5)
    heads_sd = {f"medusa_head.{k}": v for k, v in fd_state_dict(blocks, projs).items()}
    backbone = {"model.embed_tokens.weight": torch.randn(V, H), "lm_head.weight": torch.randn(V, H),
                "model.layers.0.mlp.up_proj.weight": torch.randn(2 * H, H)}
    half = dict(list(heads_sd.items())[: len(heads_sd) // 2])
    shard1 = {**backbone, **half}
    shard2 = {k: v for k, v in heads_sd.items() if k not in half}
    save_file(shard1, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_config(tmp_path, model_type="llama", hidden_size=H, vocab_size=V, medusa_num_heads=K)
    heads = load(tmp_path)
    torch.testing.assert_close(heads(hidden), reference_logits(hidden, blocks, projs))
    # The same bundle as one unsharded file.
    single = tmp_path / "one"
    single.mkdir()
    save_file({**backbone, **heads_sd}, str(single / "model.safetensors"))
    torch.testing.assert_close(load(single)(hidden), reference_logits(hidden, blocks, projs))


def test_batched_forward_matches_loop(hidden):
    heads = MedusaHeads(K, L, H, V, shared_lm_head=False, dtype=torch.float32)
    torch.nn.init.normal_(heads.block_weight, std=0.3)
    torch.nn.init.normal_(heads.block_bias, std=0.3)
    blocks = [[(heads.block_weight[h, l], heads.block_bias[h, l]) for l in range(L)] for h in range(K)]
    projs = list(heads.proj_weight)
    torch.testing.assert_close(heads(hidden), reference_logits(hidden, blocks, projs))
    heads.zero_blocks()
    torch.testing.assert_close(heads(hidden), torch.stack([hidden @ p.T for p in projs]))


@pytest.mark.parametrize("shared", [True, False])
def test_save_roundtrip_and_vllm_conversion(tmp_path, hidden, shared):
    heads = MedusaHeads(K, L, H, V, shared_lm_head=shared, dtype=torch.float32)
    torch.nn.init.normal_(heads.block_weight, std=0.3)
    torch.nn.init.normal_(heads.block_bias, std=0.3)
    lm_head = torch.randn(V, H)
    save_medusa_heads(heads, tmp_path / "fd", "some/base", dtype=torch.float32)
    cfg = json.loads((tmp_path / "fd" / "config.json").read_text())
    assert cfg["medusa_num_heads"] == K and cfg["medusa_num_layers"] == L
    assert cfg["base_model_name_or_path"] == "some/base" and cfg["shared_lm_head"] is shared
    assert (cfg["hidden_size"], cfg["vocab_size"]) == (H, V)
    again = load(tmp_path / "fd")
    want = heads(hidden, lm_head)
    torch.testing.assert_close(again(hidden, lm_head), want)

    out = convert_to_vllm_medusa(tmp_path / "fd", tmp_path / "vllm", lm_head, dtype=torch.float32)
    vcfg = json.loads((out / "config.json").read_text())
    assert vcfg["model_type"] == "medusa" and vcfg["architectures"] == ["MedusaModel"]
    assert (vcfg["num_heads"], vcfg["num_hidden_layers"], vcfg["medusa_fc_bias"]) == (K, L, True)
    assert vcfg["truncated_vocab_size"] == V
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {f"blocks.{h}.layers.{l}.{p}" for h in range(K) for l in range(L) for p in ("weight", "bias")}
    expected |= {f"lm_heads.{h}.weight" for h in range(K)}
    assert keys == expected
    converted = load(out)
    assert not converted.shared_lm_head
    torch.testing.assert_close(converted(hidden), want)


# --- bad checkpoints -------------------------------------------------------------------------------


def test_wrong_hidden_size(tmp_path):
    blocks, projs = make_weights(hidden=32)
    save_file(fd_state_dict(blocks, projs), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match=r"hidden size 32 but the base model has 16") as e:
        load(tmp_path)
    assert "medusa_lm_head.safetensors" in str(e.value)


def test_wrong_vocab(tmp_path):
    blocks, projs = make_weights(vocab=64)
    torch.save(fd_state_dict(blocks, projs), tmp_path / "medusa_lm_head.pt")
    with pytest.raises(MedusaHeadsError, match=r"vocab size 64 but the base model has 50"):
        load(tmp_path)


def test_wrong_vocab_in_config_of_shared_heads(tmp_path):
    blocks, _ = make_weights(own_proj=False)
    write_config(tmp_path, vocab_size=32000, hidden_size=H)
    save_file(fd_state_dict(blocks, None), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match=r"vocab size 32000"):
        load(tmp_path)


@pytest.mark.parametrize("drop, problem", [
    ("1.0.linear.bias", "have a bias"),
    ("2.2.weight", "missing vocab projection weights for heads \\[2\\]"),
    ("1.1.linear.weight", "missing key for head 1 block 1: weight"),
    ("1.1.linear.*", "inconsistent layer counts"),
])
def test_missing_keys(tmp_path, drop, problem):
    blocks, projs = make_weights()
    sd = fd_state_dict(blocks, projs)
    for key in [k for k in sd if k == drop or (drop.endswith("*") and k.startswith(drop[:-1]))]:
        del sd[key]
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match=problem):
        load(tmp_path)


def test_unexpected_keys(tmp_path):
    blocks, projs = make_weights()
    sd = fd_state_dict(blocks, projs)
    sd["optimizer.step"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match="unexpected keys \\['optimizer.step'\\]"):
        load(tmp_path)


@pytest.mark.parametrize("name", ["medusa_lm_head.pt", "medusa_lm_head.safetensors"])
def test_garbage_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a checkpoint at all\x00\x01")
    with pytest.raises(MedusaHeadsError, match=f"{name}: not a readable weights file"):
        load(tmp_path)


def test_nan(tmp_path):
    blocks, projs = make_weights()
    sd = fd_state_dict(blocks, projs)
    sd["1.1.linear.weight"][3, 4] = float("nan")
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match="head 1 block 1 weight has 1 non-finite"):
        load(tmp_path)


def test_empty_dir_and_missing_path(tmp_path):
    with pytest.raises(MedusaHeadsError, match="no weights found"):
        load(tmp_path)
    with pytest.raises(MedusaHeadsError, match="no such file"):
        load(tmp_path / "nope")
    assert issubclass(MedusaHeadsError, ValueError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_vocab_projection_matches_restricted_lm_head(dtype):
    """The drafter's packed projection onto the token_map rows (vLLM's CPU GEMM) gives the same
    top-k tokens as the full lm_head restricted to that vocabulary."""
    from vllm_medusa.proposer import draft_vocab_projection

    g = torch.Generator().manual_seed(0)
    lm_head = torch.randn(512, 64, generator=g).to(dtype)
    token_map = torch.randperm(512, generator=g)[:200].sort().values
    x = torch.randn(7, 64, generator=g).to(dtype)
    logits = draft_vocab_projection(lm_head, token_map)(x)
    expected = F.linear(x.float(), lm_head[token_map].float())
    assert logits.shape == (7, 200)
    torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.02)
    assert torch.equal(logits.float().topk(3).indices, expected.topk(3).indices)


# --- token-conditioned heads ---------------------------------------------------------------------


def test_token_conditioned_heads_match_reference_and_roundtrip(tmp_path, hidden):
    """The first block also sees the produced token's embedding: x + SiLU(W x + U e + b)."""
    heads = MedusaHeads(K, L, H, V, shared_lm_head=True, token_conditioned=True, dtype=torch.float32)
    for p in (heads.block_weight, heads.block_bias, heads.token_weight):
        torch.nn.init.normal_(p, std=0.3)
    lm_head, embeds = torch.randn(V, H), torch.randn(B, H)
    want = []
    for h in range(K):
        x = hidden
        for layer in range(L):
            pre = F.linear(x, heads.block_weight[h, layer], heads.block_bias[h, layer])
            if layer == 0:
                pre = pre + F.linear(embeds, heads.token_weight[h])
            x = x + F.silu(pre)
        want.append(x @ lm_head.T)
    got = heads(hidden, lm_head, token_embeds=embeds)
    torch.testing.assert_close(got, torch.stack(want))
    assert not torch.allclose(got, heads(hidden, lm_head, token_embeds=torch.zeros(B, H)))

    save_medusa_heads(heads, tmp_path / "tc", "some/base", dtype=torch.float32)
    assert json.loads((tmp_path / "tc" / "config.json").read_text())["token_conditioned"] is True
    again = load(tmp_path / "tc")
    assert again.token_conditioned
    torch.testing.assert_close(again(hidden, lm_head, token_embeds=embeds), got)
    with pytest.raises(MedusaHeadsError, match="token-conditioned heads cannot run as vLLM 0.32's MedusaModel"):
        convert_to_vllm_medusa(tmp_path / "tc", tmp_path / "vllm", lm_head)


def test_token_embeds_are_required_exactly_for_token_conditioned_heads(hidden):
    tc = MedusaHeads(K, L, H, V, token_conditioned=True, dtype=torch.float32)
    plain = MedusaHeads(K, L, H, V, dtype=torch.float32)
    lm_head = torch.randn(V, H)
    with pytest.raises(ValueError, match="token-conditioned: pass token_embeds"):
        tc(hidden, lm_head)
    with pytest.raises(ValueError, match="not token-conditioned"):
        plain(hidden, lm_head, token_embeds=torch.zeros(B, H))
    with pytest.raises(ValueError, match="token_embeds must be"):
        tc(hidden, lm_head, token_embeds=torch.zeros(B + 1, H))
    with pytest.raises(ValueError, match="at least one residual block"):
        MedusaHeads(K, 0, H, V, token_conditioned=True)


def test_token_conditioned_checkpoint_errors(tmp_path):
    blocks, _ = make_weights(own_proj=False)
    sd = fd_state_dict(blocks, None)
    sd.update({f"{h}.token.weight": torch.zeros(H, H) for h in range(K - 1)})  # one head short
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match=r"token weights for heads \[0, 1\], but the checkpoint has heads \[0, 1, 2\]"):
        load(tmp_path)
    sd = fd_state_dict(blocks, None)
    sd.update({f"{h}.token.weight": torch.zeros(H + 1, H + 1) for h in range(K)})
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match="hidden size 17 but the base model has 16"):
        load(tmp_path)
    write_config(tmp_path, token_conditioned=True)
    save_file(fd_state_dict(blocks, None), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(MedusaHeadsError, match="config says token_conditioned"):
        load(tmp_path)
    write_config(tmp_path, token_conditioning="path")
    with pytest.raises(MedusaHeadsError, match="config says token_conditioning 'path' but there are no "
                                               r"\{h\}.token.weight tensors"):
        load(tmp_path)


def test_proposer_feeds_the_produced_token_to_token_conditioned_heads():
    """``propose_trees`` embeds each request's last token with the base model's input embedding."""
    from vllm_medusa.proposer import MedusaTreeProposer
    from vllm_medusa.trees import MedusaTree, chain

    g = torch.Generator().manual_seed(0)
    heads = MedusaHeads(2, 1, H, V, token_conditioned=True, dtype=torch.float32)
    for p in (heads.block_weight, heads.token_weight):
        p.data.normal_(0, 1.0, generator=g)
    emb, lm_head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    proposer = MedusaTreeProposer.__new__(MedusaTreeProposer)
    proposer.heads, proposer.lm_head_weight, proposer.draft_projection = heads, lm_head, None
    proposer.compute_logits = None
    proposer.embed_tokens = lambda ids: emb[ids]
    hidden, tokens = torch.randn(3, H, generator=g), [4, 9, 4]
    drafts, _ = proposer.propose_trees(hidden, MedusaTree.from_paths(chain(2)), [2, 2, 2], tokens)
    want = heads(hidden, lm_head, token_embeds=emb[torch.tensor(tokens)]).argmax(-1).t().tolist()
    assert drafts == want
    with pytest.raises(ValueError, match="need the tokens just produced"):
        proposer.propose_trees(hidden, MedusaTree.from_paths(chain(2)), [2, 2, 2])


def _path_heads(seed: int = 0) -> tuple[MedusaHeads, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heads = MedusaHeads(K, L, H, V, token_conditioned=True, path_conditioned=True, dtype=torch.float32)
    for p in (heads.block_weight, heads.block_bias, heads.token_weight):
        p.data.normal_(0, 1.0, generator=g)
    return heads, torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)


def test_path_conditioned_heads_see_one_token_per_head(tmp_path):
    """Head k of path-conditioned heads is the token-conditioned head k fed its own token; the
    checkpoint says so (``token_conditioning: "path"``) and loads back as such."""
    heads, emb, lm_head = _path_heads()
    hidden = torch.randn(B, H)
    per_head = torch.randint(0, V, (K, B))
    got = heads(hidden, lm_head, token_embeds=emb[per_head])
    for k in range(K):
        alone = heads(hidden, lm_head, num_heads=1, token_embeds=emb[per_head[k]], first=k)
        torch.testing.assert_close(got[k], alone[0])
    with pytest.raises(ValueError, match="one token per head"):
        heads(hidden, lm_head, token_embeds=emb[per_head[0]])
    with pytest.raises(ValueError, match=r"heads 2..3 asked of 3"):
        heads(hidden, lm_head, num_heads=2, token_embeds=emb[per_head[:2]], first=2)

    save_medusa_heads(heads, tmp_path / "path", "some/base", dtype=torch.float32)
    assert json.loads((tmp_path / "path" / "config.json").read_text())["token_conditioning"] == "path"
    again = load(tmp_path / "path")
    assert again.path_conditioned
    torch.testing.assert_close(again(hidden, lm_head, token_embeds=emb[per_head]), got)
    config = json.loads((tmp_path / "path" / "config.json").read_text())
    (tmp_path / "path" / "config.json").write_text(json.dumps({**config, "token_conditioning": "sideways"}))
    with pytest.raises(MedusaHeadsError, match="token_conditioning must be 'bonus' or 'path', got 'sideways'"):
        load(tmp_path / "path")


def test_path_tokens_shift_by_head():
    from vllm_medusa.heads import path_tokens

    tokens = torch.tensor([10, 11, 12, 13])
    assert path_tokens(tokens, 3).tolist() == [[10, 11, 12, 13], [11, 12, 13, 13], [12, 13, 13, 13]]
    assert path_tokens(tokens, 2, torch.tensor([2, 0])).tolist() == [[12, 10], [13, 11]]


def test_proposer_drafts_path_conditioned_trees_depth_by_depth():
    """Every node's children are its head's top guesses given that node's own token, for requests
    of one batch with trees cut to different sizes."""
    from vllm_medusa.proposer import MedusaTreeProposer
    from vllm_medusa.trees import MedusaTree

    heads, emb, lm_head = _path_heads(1)
    proposer = MedusaTreeProposer.__new__(MedusaTreeProposer)
    proposer.heads, proposer.lm_head_weight, proposer.draft_projection = heads, lm_head, None
    proposer.compute_logits, proposer.branch_stats = None, None
    proposer.embed_tokens = lambda ids: emb[ids]
    tree = MedusaTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]])
    hidden, tokens, sizes = torch.randn(2, H), [4, 9], [7, 3]
    drafts, trees = proposer.propose_trees(hidden, tree, sizes, tokens)

    def guesses(b: int, token: int, depth: int) -> list[int]:
        logits = heads(hidden[b:b + 1], lm_head, num_heads=1, token_embeds=emb[[token]], first=depth)
        return logits[0, 0].topk(3).indices.tolist()

    for b in range(2):
        assert trees[b].num_nodes == sizes[b]
        want = {(): tokens[b]}
        for path in trees[b].paths:
            want[path] = guesses(b, want[path[:-1]], len(path) - 1)[path[-1]]
        assert drafts[b] == [want[p] for p in trees[b].paths]


def test_inference_forward_follows_weight_updates():
    """Outside autograd a multi-layer head reads a contiguous copy of each layer's weights; it gives
    the same logits as the autograd path and is rebuilt when the weights change in place."""
    heads, emb, lm_head = _path_heads(2)
    hidden, per_head = torch.randn(B, H), emb[torch.randint(0, V, (K, B))]
    with torch.inference_mode():
        first = heads(hidden, lm_head, token_embeds=per_head)
    torch.testing.assert_close(first, heads(hidden, lm_head, token_embeds=per_head).detach())
    with torch.no_grad():
        heads.block_weight[1, 1].mul_(-1)
    with torch.inference_mode():
        second = heads(hidden, lm_head, token_embeds=per_head)
    assert not torch.allclose(first[1], second[1])
    torch.testing.assert_close(second, heads(hidden, lm_head, token_embeds=per_head).detach())
