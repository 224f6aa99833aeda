"""GPU self-check of the tree-attention kernel, with torch and Triton only (vLLM is not imported).

    python -m vllm_medusa.gpu_check [--quick] [--dtype bf16|fp16|fp32] [--no-bench]

1. compiles the Triton tree-attention kernel for the device (the first call, timed);
2. runs the kernel's correctness matrix (``kernels/cases.py``, the one the test suite runs under the
   interpreter) against the float64 reference, in bf16, fp16 and fp32;
3. times the tree pass against causal attention over the same rows (the same kernel with every
   request flagged causal: what the rows cost as a chain), for 1-64 requests x 4-64 tree nodes x
   1k-8k tokens of context (fewer and smaller with ``--quick``), and prints a table.

Exits 1 when any case exceeds its tolerance (or writes NaN). Without a CUDA device it runs the
``--quick`` matrix through Triton's interpreter (``TRITON_INTERPRET=1``), correctness only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BENCH = {"requests": (1, 4, 16, 64), "nodes": (4, 16, 64), "context": (1024, 4096, 8192)}
QUICK_BENCH = {"requests": (1, 16), "nodes": (16, 64), "context": (1024, 4096)}


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def correctness(kernel, device: str, quick: bool) -> list[tuple[str, str, float, float, bool]]:
    """(case, dtype, relative error, tolerance, ok) for every case of the matrix: each case in its
    own dtype and, unless quick, in the other two as well, then the random batches."""
    from dataclasses import replace

    from vllm_medusa.kernels.cases import (CASES, NUM_RANDOM_SEEDS, QUICK_CASE_IDS, TOL, case_batch,
                                           random_batch, relative_error)

    rows = []
    for case in CASES:
        if quick and case.id not in QUICK_CASE_IDS:
            continue
        dtypes = [case.dtype] if quick else [case.dtype] + [d for d in DTYPES.values() if d != case.dtype]
        for dtype in dtypes:
            rel = relative_error(kernel, case_batch(replace(case, dtype=dtype), device), dtype)
            rows.append((case.id, _name(dtype), rel, TOL[dtype], rel < TOL[dtype]))
    for seed in range(0 if quick else NUM_RANDOM_SEEDS):
        inputs, dtype, what = random_batch(seed, device)
        rel = relative_error(kernel, inputs, dtype)
        rows.append((f"random-{seed} ({what})", _name(dtype), rel, TOL[dtype], rel < TOL[dtype]))
    return rows


def bench(kernel, dtype: torch.dtype, sizes: dict) -> list[tuple[int, int, int, float, float]]:
    """(requests, nodes, context, tree ms, causal ms) per shape, Llama-3-8B-like heads (32 query,
    8 KV, head size 128, block size 16), one layer."""
    from triton.testing import do_bench

    from vllm_medusa.kernels.cases import bench_batch

    rows = []
    for r in sizes["requests"]:
        for n in sizes["nodes"]:
            for ctx in sizes["context"]:
                inputs = bench_batch(r, n, ctx, dtype=dtype, device="cuda")
                out = torch.empty_like(inputs["q"])
                causal = dict(inputs, causal=torch.ones(r, dtype=torch.int32, device="cuda"))
                tree_ms = do_bench(lambda: kernel(**inputs, out=out))
                causal_ms = do_bench(lambda: kernel(**causal, out=out))
                rows.append((r, n, ctx, tree_ms, causal_ms))
                del inputs, causal, out
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_medusa.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases, fewer and smaller shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the timing table")
    parser.add_argument("--no-bench", action="store_true", help="correctness only")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        # Must precede the first triton import (the test suite's conftest sets it as well).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    device = "cuda" if cuda and not interpreting else "cpu"
    quick = args.quick or device == "cpu"
    import triton

    from vllm_medusa.kernels.tree_attention_triton import tree_attention_paged

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
              f"triton {triton.__version__}")
        from vllm_medusa.kernels.cases import bench_batch

        t0 = time.perf_counter()
        tree_attention_paged(**bench_batch(1, 4, 64, dtype=DTYPES[args.dtype], device="cuda"))
        torch.cuda.synchronize()
        print(f"kernel compiled and ran in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"no CUDA device: Triton interpreter (TRITON_INTERPRET=1), --quick matrix, correctness "
              f"only; torch {torch.__version__}, triton {triton.__version__}")

    rows = correctness(tree_attention_paged, device, quick)
    print("\ncorrectness against the float64 reference (relative error = max |err| / max |ref|)")
    print(_table(["case", "dtype", "rel. error", "tolerance", "result"],
                 [(c, d, f"{e:.2e}", f"{t:.0e}", "ok" if ok else "MISMATCH") for c, d, e, t, ok in rows]))
    failed = [r for r in rows if not r[4]]

    if device == "cuda" and not args.no_bench:
        dtype = DTYPES[args.dtype]
        timing = bench(tree_attention_paged, dtype, QUICK_BENCH if quick else BENCH)
        print(f"\ntree pass vs causal attention over the same rows ({args.dtype}, one layer, 32/8 "
              f"heads, head size 128, block size 16; same kernel, causal = every request flagged "
              f"causal)")
        print(_table(["requests", "nodes", "context", "tree ms", "causal ms", "tree/causal"],
                     [(str(r), str(n), str(c), f"{t:.3f}", f"{k:.3f}", f"{t / k:.2f}x")
                      for r, n, c, t, k in timing]))

    if failed:
        print(f"\nFAILED: {len(failed)} of {len(rows)} cases exceed their tolerance", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} cases within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
