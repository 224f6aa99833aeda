"""The CPU tree pass of attention alone, per layer: reading the context from vLLM's packed cache as
strided views (what runs) against the element-wise gather (the fallback), in one run.

    python bench/tree_pass.py [--contexts 128,400,1000] [--requests 1,4] [--out FILE]

Shapes are the model's (heads, KV heads, head size, layers; default the demo SmolLM2), the cache
packing is the one vLLM's CPU backend picks for this machine, dtype and block size (learned through
vLLM's own write op), and torch runs on one thread, as vLLM's CPU worker does on a 2-core machine.
Each row: R same-size trees back to back over contexts of about C tokens each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FOUR = "[[0],[0,0],[1],[2]]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (its config.json gives the shapes)")
    p.add_argument("--trees", default=f"{FOUR};default", help="';'-separated tree specs (JSON, preset, "
                   "or 'default' = the demo heads' tree)")
    p.add_argument("--contexts", default="128,400,1000")
    p.add_argument("--requests", default="1,4")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seconds", type=float, default=0.5, help="timing per configuration and variant")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args()

    import torch
    from tqdm import tqdm
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_medusa.attention import TreeAttentionBatch, paged_tree_attention
    from vllm_medusa.cpu_runner import cpu_kv_layout
    from vllm_medusa.demo import demo_heads_path, demo_model_path
    from vllm_medusa.proposer import heads_default_tree
    from vllm_medusa.trees import resolve_tree

    torch.set_num_threads(1)
    model = args.model or str(demo_model_path())
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    hq, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    hk = cfg.get("num_key_value_heads", hq)
    d = cfg.get("head_dim") or cfg["hidden_size"] // hq
    dtype = getattr(torch, args.dtype)
    bs = args.block_size
    isa = _get_attn_isa(dtype, bs, d)
    strided = cpu_kv_layout(isa, bs, d, dtype)
    gather = copy.copy(strided)
    gather.k_strides = gather.v_strides = None  # the element-wise fallback, same packing

    default = heads_default_tree(str(demo_heads_path()))
    trees = [(spec, resolve_tree(None if spec == "default" else spec, num_heads=16, default=default))
             for spec in args.trees.split(";")]
    contexts = [int(c) for c in args.contexts.split(",")]
    requests = [int(r) for r in args.requests.split(",")]

    def per_layer(layout, batch, q, k, v, kv, out) -> float:
        for _ in range(5):
            paged_tree_attention(q, k, v, kv, layout, batch, d ** -0.5, out)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            paged_tree_attention(q, k, v, kv, layout, batch, d ** -0.5, out)
            n += 1
        return (time.perf_counter() - t0) / n

    rows = []
    configs = [(t, c, r) for t in trees for c in contexts for r in requests]
    for (name, tree), ctx, r in tqdm(configs, desc="tree pass"):
        nb = (ctx + bs - 1) // bs
        kv = torch.randn(1 + r * nb, hk, bs, 2 * d).to(dtype)
        ctxs = [max(1, ctx - 7 * i) for i in range(r)]  # a little ragged, as real requests are
        blocks = [torch.arange(1 + i * nb, 1 + (i + 1) * nb) for i in range(r)]
        n = tree.num_rows
        batch = TreeAttentionBatch.build([i * n for i in range(r)], [tree.ancestor_masks] * r, ctxs,
                                         blocks, bs)
        q = torch.randn(r * n, hq, d).to(dtype)
        k, v = (torch.randn(r * n, hk, d).to(dtype) for _ in range(2))
        out = torch.empty(r * n, hq, d, dtype=dtype)
        fast = per_layer(strided, batch, q, k, v, kv, out)
        slow = per_layer(gather, batch, q, k, v, kv, out)
        rows.append(f"| {name} | {tree.num_nodes} | {ctx} | {r} | {fast * 1e3:.3f} | {fast * layers * 1e3:.1f} "
                    f"| {slow * 1e3:.3f} | {slow / fast:.2f}x |")
    table = "\n".join([
        f"# CPU tree pass ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`{os.path.basename(model)}`: {hq} heads, {hk} KV heads, head size {d}, {layers} layers; "
        f"{args.dtype}, block size {bs}, vLLM CPU ISA `{isa}`, 1 thread.",
        "",
        "| tree | nodes | context | requests | strided ms/layer | x layers (ms/step) | gather ms/layer | gather / strided |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
