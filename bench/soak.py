"""Soak run: one server under a steady mixed load for N minutes; no request may be lost and the
server's memory must stay flat after warm-up.

    .venv/bin/python bench/soak.py --minutes 10 --rate 2                 # medusa_tree server
    .venv/bin/python bench/soak.py --minutes 10 --rate 2 --method plain
    .venv/bin/python bench/soak.py --smoke                                # 1 minute, for tests

Requests arrive as a Poisson process at --rate per second on loopback, cycling through MT-Bench and
ShareGPT prompts with a mix of sampling settings (greedy, temperature with top-p/top-k, seeded,
penalties, stop strings, n=2, streaming) and 32-128 new tokens. Every 5 s the
resident memory of the server's whole process group (API server, engine core) is sampled. Writes
soak.json, soak.md and rss.png (copied to bench/latest unless --latest '').
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from common import BENCH, bench_prompts, copy_latest, default_heads, default_model, md_table, results_dir, setup_env, write_json
from online import server_process


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--heads")
    p.add_argument("--method", choices=("medusa_tree", "plain"), default="medusa_tree")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    p.add_argument("--warmup-minutes", type=float, default=1.0,
                   help="RSS growth is measured from this point on")
    p.add_argument("--server-args", default="--max-num-batched-tokens 512")
    p.add_argument("--name")
    p.add_argument("--out")
    p.add_argument("--latest", default=str(BENCH / "latest"))
    p.add_argument("--smoke", action="store_true", help="1 minute at 1 request/s, 0.25 min warm-up")
    args = p.parse_args()
    if args.smoke:
        args.minutes, args.rate, args.warmup_minutes, args.latest = 1.0, 1.0, 0.25, ""
    return args


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the process group, in MiB (Linux /proc)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # field 5 of stat: the process group
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss pages
    return total / 2**20


SETTINGS: list[dict[str, Any]] = [
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    {"temperature": 0.7, "seed": 11},
    {"temperature": 0.7, "presence_penalty": 0.4, "repetition_penalty": 1.1},
    {"temperature": 0, "stop": ["\n\n"]},
    {"temperature": 0.9, "n": 2},
    {"temperature": 0.5, "stream": True},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 0, "logit_bias": {"13": -100, "30": 5}},
]


async def one(client: Any, base: str, i: int, prompt: str, at: float) -> dict:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    rng = random.Random(i)
    body = {"model": "soak", "prompt": prompt, "max_tokens": rng.choice([32, 64, 96, 128]),
            **SETTINGS[i % len(SETTINGS)]}
    sent = time.perf_counter()
    try:
        if body.get("stream"):
            done = False
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                status = resp.status_code
                async for line in resp.aiter_lines():
                    done = done or line.strip() == "data: [DONE]"
            ok = status == 200 and done
        else:
            resp = await client.post(f"{base}/v1/completions", json=body)
            status = resp.status_code
            ok = status == 200 and all(c.get("finish_reason") in ("stop", "length")
                                       for c in resp.json()["choices"])
        return {"i": i, "ok": ok, "status": status, "latency_s": time.perf_counter() - sent}
    except Exception as e:  # a lost request: the point of the soak is to count them
        return {"i": i, "ok": False, "error": repr(e), "latency_s": time.perf_counter() - sent}


async def drive(base: str, pgid: int, prompts: list[str], args: argparse.Namespace) -> tuple[list[dict], list]:
    import httpx

    rng = random.Random(0)
    duration = 60 * args.minutes
    t0 = time.perf_counter() + 0.1
    offsets, t = [], 0.0
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(args.rate)
    rss: list[tuple[float, float]] = []

    async def sample_rss() -> None:
        while True:
            rss.append((time.perf_counter() - t0, group_rss_mib(pgid)))
            await asyncio.sleep(5)

    from tqdm import tqdm

    sampler = asyncio.create_task(sample_rss())
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        tasks = [asyncio.create_task(one(client, base, i, prompts[i % len(prompts)], t0 + o))
                 for i, o in enumerate(offsets)]
        with tqdm(total=len(tasks), unit="req", desc="soak") as bar:
            for fut in asyncio.as_completed(tasks):
                await fut
                bar.update(1)
    sampler.cancel()
    rss.append((time.perf_counter() - t0, group_rss_mib(pgid)))
    return [t.result() for t in tasks], rss


def main() -> None:
    args = parse_args()
    setup_env()
    model = args.model or default_model()
    heads = args.heads or default_heads()
    out = results_dir(args.out, args.name)
    prompts = bench_prompts(model)
    flags = ["--enforce-eager", "--max-model-len", "2048", "--served-model-name", "soak",
             *args.server_args.split()]
    if args.method == "medusa_tree":
        flags += ["--speculative-model", f"medusa:{heads}"]
    with server_process(model, flags, out / "server.log", 900) as (base, proc):
        records, rss = asyncio.run(drive(base, os.getpgid(proc.pid), prompts, args))
        import httpx

        healthy = httpx.get(f"{base}/health", timeout=30).status_code == 200
    warm = [m for t, m in rss if t >= 60 * args.warmup_minutes] or [m for _, m in rss]
    lost = [r for r in records if not r["ok"]]
    result = {"method": args.method, "minutes": args.minutes, "rate": args.rate, "requests": len(records),
              "answered": len(records) - len(lost), "lost": len(lost), "healthy_after": healthy,
              "rss_mib_after_warmup": round(warm[0], 1), "rss_mib_end": round(warm[-1], 1),
              "rss_growth_mib": round(warm[-1] - warm[0], 1), "rss_max_mib": round(max(m for _, m in rss), 1),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": lost[:10], "rss": rss}
    write_json(out / "soak.json", result)
    keys = ["method", "minutes", "rate", "requests", "answered", "lost", "healthy_after",
            "rss_mib_after_warmup", "rss_mib_end", "rss_growth_mib", "rss_max_mib"]
    text = (f"# Soak run ({result['started']})\n\n`python bench/soak.py --method {args.method} --minutes "
            f"{args.minutes:g} --rate {args.rate:g}`; RSS of the server's process group (MiB), "
            f"growth measured after {args.warmup_minutes:g} min of warm-up.\n\n"
            + md_table(keys, [[result[k] for k in keys]]))
    (out / "soak.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([t / 60 for t, _ in rss], [m for _, m in rss], marker=".")
    ax.axvline(args.warmup_minutes, color="grey", ls="--", lw=1)
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"{args.method} server, {args.rate:g} req/s: {len(lost)} of {len(records)} lost")
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=110)
    plt.close(fig)
    copy_latest([out / "soak.md", out / "soak.json", out / "rss.png"], args.latest or None)
    print(text)
    print(f"results in {out}")
    if lost or not healthy:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
