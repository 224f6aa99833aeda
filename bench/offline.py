"""Offline benchmark: plain decoding vs chain Medusa, ngram and Medusa trees, on MT-Bench first turns.

    .venv/bin/python bench/offline.py                 # everything, ~all defaults (takes a while)
    .venv/bin/python bench/offline.py --smoke         # seconds of generation, for tests
    .venv/bin/python bench/offline.py --methods plain,tree-8 --batch-sizes 1,4 --repeats 1
    .venv/bin/python bench/offline.py --methods plain,adaptive --modes cold,warm --batch-sizes 1,4,16,64,shift

Every method is one engine in its own child process; a method that crashes costs only its own rows.
Engines run in groups (`--concurrent`, default 4 alive at once, plain decoding in every group): they
start one at a time, warm up (one generate per temperature, not measured), then every batch size x
temperature x repeat is run on each engine of the group in turn - `LLM.generate` on batches of B
MT-Bench prompts one after the other, max(B, --min-prompts) prompts in all, timed on the wall clock,
while the other engines idle. The order rotates with the
repeat. So a drift of the shared machine hits every method alike, and each ratio is to the plain runs
of the same group. Quoted figures are medians over repeats; acceptance comes from vLLM's spec-decode
counters summed over repeats.

Cold mode (`--modes cold`) measures what a user starting an engine gets: every (configuration,
repeat, method) is a fresh engine, one alive at a time, with no warm-up: the first prompts are timed
from the first step. `--profile-cache new` (default) gives each engine an empty policy-profile cache
(the first engine ever on the machine); `--profile-cache DIR` shares DIR (engines after the first
start from what earlier ones saved). Batch size `shift` is a shifting load: a burst of 16 requests
that drains to 1 as they finish, then another burst of 16.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from common import (BENCH, Method, base_tree, bench_prompts, chain_heads_for, chain_heads_note, copy_latest,
                    default_heads, default_model, make_method, md_table, median, parse_list, results_dir,
                    setup_env, take, write_json)

DEFAULT_METHODS = "plain,medusa_chain,ngram,tree-4,tree-8,tree-16,tree-mc_sim_7b_63,adaptive"
DEFAULTS = dict(methods=DEFAULT_METHODS, batch_sizes="1,4,16,64", temperatures="0,0.7", repeats=3,
                max_tokens=128, num_prompts=80, min_prompts=8, latest=str(BENCH / "latest"))
SMOKE = dict(methods="plain,tree-4", batch_sizes="1,2", temperatures="0,0.7", repeats=1,
             max_tokens=8, num_prompts=2, min_prompts=2, latest=None)
READY = "@@bench-ready "
RESULT = "@@bench-result "
WARMUP_PROMPT = "Write one sentence about the sea."  # unrelated to MT-Bench
SHIFT = "shift"
SHIFT_BURSTS = (16, 16)  # the shifting load: bursts submitted one after the other, each draining


def parse_batches(text: str) -> list:
    """Batch sizes: integers, or ``shift`` for the shifting load."""
    return [x.strip() if x.strip() == SHIFT else int(x) for x in text.split(",") if x.strip()]


def batch_key(b: Any) -> tuple:
    return (isinstance(b, str), b if isinstance(b, int) else 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model folder or name (default: the demo SmolLM2)")
    p.add_argument("--heads", help="Medusa heads folder (default: the demo heads)")
    p.add_argument("--chain-heads", help="heads for medusa_chain (default: --heads, or the demo's "
                                         "Medusa-1 heads when --heads are token-conditioned)")
    p.add_argument("--tree", help="base tree for tree-N and adaptive: preset, chain-N, JSON list or "
                                  "file (default: the heads' tree.json, else mc_sim_7b_63)")
    p.add_argument("--methods", help=f"comma list (default {DEFAULT_METHODS}); tree-N = base tree "
                                     "cut to N nodes, tree-NAME = a whole preset/JSON tree")
    p.add_argument("--batch-sizes", help="comma list (default 1,4,16,64); 'shift' = bursts of 16 that "
                                         "drain as requests finish")
    p.add_argument("--modes", default="warm",
                   help="warm (engines warmed up and reused, default), cold (a fresh engine per "
                        "configuration and repeat, nothing excluded), or both: cold,warm")
    p.add_argument("--profile-cache", default="new",
                   help="policy-profile cache of the medusa_tree engines: 'new' (an empty one per "
                        "engine, default) or a folder shared by every engine of the run")
    p.add_argument("--temperatures", help="comma list (default 0,0.7)")
    p.add_argument("--repeats", type=int, help="runs per configuration, median quoted (default 3)")
    p.add_argument("--max-tokens", type=int, help="max new tokens per prompt (default 128)")
    p.add_argument("--num-prompts", type=int, help="MT-Bench prompts to draw from (default 80)")
    p.add_argument("--min-prompts", type=int,
                   help="prompts per configuration at least: batch B runs ceil(N/B) batches of B "
                        "prompts one after the other, so small batches are not one prompt's "
                        "figure (default 8)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="no torch.compile / CUDA graphs, for every method (default on)")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="off by default: repeats would otherwise skip the prefill of repeat 1")
    p.add_argument("--engine-args", type=json.loads, default={}, help="extra LLM(...) kwargs as JSON")
    p.add_argument("--method-timeout", type=float, default=None,
                   help="seconds an engine may take to start or to answer one configuration")
    p.add_argument("--concurrent", type=int, default=4,
                   help="engines alive at once (plain counts; it joins every group); runs are "
                        "interleaved among them. 1 = one method at a time (default 4)")
    p.add_argument("--name", help="results folder name under bench/results/ (default: a timestamp)")
    p.add_argument("--out", help="results folder (overrides --name)")
    p.add_argument("--latest", help="also copy table, summary and plots here (default bench/latest; "
                                    "none with --smoke); '' to skip")
    p.add_argument("--smoke", action="store_true", help="2 prompts, 8 tokens, batch 1 and 2, 1 repeat, "
                                                        "plain and tree-4")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---- child: one engine, all configurations ------------------------------------------------------

def read_counters(llm: Any, medusa: bool) -> dict:
    """vLLM's cumulative spec-decode counters (and the plugin's, for medusa_tree engines)."""
    from vllm.v1.metrics.reader import Counter, Vector

    c: dict[str, Any] = {"drafts": 0, "accepted": 0, "per_pos": []}
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_drafts" and isinstance(m, Counter):
            c["drafts"] += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens" and isinstance(m, Counter):
            c["accepted"] += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos" and isinstance(m, Vector):
            c["per_pos"] = add_lists(c["per_pos"], m.values)
    if medusa:
        c["medusa"] = llm.collective_rpc("medusa_stats")[0]
    return c


def add_lists(a: list, b: list, sign: int = 1) -> list:
    n = max(len(a), len(b))
    a, b = list(a) + [0] * (n - len(a)), list(b) + [0] * (n - len(b))
    return [x + sign * y for x, y in zip(a, b)]


def diff_counters(after: dict, before: dict) -> dict:
    d = {"drafts": after["drafts"] - before["drafts"], "accepted": after["accepted"] - before["accepted"],
         "per_pos": add_lists(after["per_pos"], before["per_pos"], -1)}
    if "medusa" in after:
        a, b = after["medusa"], before["medusa"]
        d["medusa"] = {k: add_lists(a[k], b[k], -1) if isinstance(a[k], list) else a[k] - b[k]
                       for k in ("tree_steps", "accepted_tokens", "nodes", "accepted_per_depth", "non_leftmost")}
    return d


def tpot_ms(output: Any) -> float | None:
    """Decode time per token of one request, from the engine's first/last token timestamps."""
    m, n = output.metrics, len(output.outputs[0].token_ids)
    if m is None or n < 2 or not m.last_token_ts > m.first_token_ts:
        return None
    return 1000 * (m.last_token_ts - m.first_token_ts) / (n - 1)


def worker(job_file: str) -> None:
    """One engine; runs one configuration per command line on stdin, answers with a RESULT line."""
    job = json.loads(Path(job_file).read_text())
    import vllm
    from vllm import LLM, SamplingParams

    medusa = bool(job["spec"]) and job["spec"]["method"] == "medusa_tree"
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], speculative_config=job["spec"], **job["engine"])
    start_s = time.perf_counter() - t0
    pool = bench_prompts(job["model"], job["num_prompts"])
    if job.get("warmup", True):
        for t in job["temperatures"]:
            llm.generate([WARMUP_PROMPT] * 2, SamplingParams(temperature=t, max_tokens=16), use_tqdm=False)
    print(READY, json.dumps({"vllm_version": vllm.__version__, "engine_start_s": start_s}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        b, t = cmd["batch_size"], cmd["temperature"]
        params = SamplingParams(temperature=t, max_tokens=job["max_tokens"], ignore_eos=False)
        bursts = list(SHIFT_BURSTS) if b == SHIFT else [b] * -(-max(b, job["min_prompts"]) // b)
        prompts = take(pool, sum(bursts))
        before = read_counters(llm, medusa)
        t0 = time.perf_counter()
        outs, i = [], 0
        for n in bursts:
            outs += llm.generate(prompts[i:i + n], params, use_tqdm=False)
            i += n
        elapsed = time.perf_counter() - t0
        after = read_counters(llm, medusa)
        spec = diff_counters(after, before)
        tokens = [len(o.outputs[0].token_ids) for o in outs]
        run = {"method": job["method"], "mode": job.get("mode", "warm"), "group": job["group"],
               "batch_size": b, "temperature": t,
               "repeat": cmd["repeat"], "elapsed_s": elapsed, "output_tokens": sum(tokens),
               "tokens_per_s": sum(tokens) / elapsed, "tpot_ms": median([tpot_ms(o) for o in outs]), **spec,
               "output_hashes": [hashlib.sha1(str(list(o.outputs[0].token_ids)).encode()).hexdigest()[:12]
                                 for o in outs]}
        if medusa:  # what the adaptive policy has measured so far (tokens/s per candidate)
            run["policy"] = after["medusa"].get("policy", {})
            run["exploration"] = after["medusa"].get("exploration", {})
        print(RESULT, json.dumps(run), flush=True)


# ---- parent: engines in groups, configurations interleaved, then summary, table, plots -------------

class Engine:
    """A worker process holding one method's engine; its vLLM log goes to logs/<method>.log."""

    def __init__(self, method: Method, group: Any, args: argparse.Namespace, model: str, out: Path,
                 mode: str = "warm"):
        (out / "logs").mkdir(exist_ok=True)
        self.method, self.group = method, group
        tag = f"{method.name}.g{group}"
        job = {"method": method.name, "group": group, "mode": mode, "warmup": mode == "warm",
               "spec": method.spec, "model": model,
               "temperatures": parse_list(args.temperatures, float), "max_tokens": args.max_tokens,
               "num_prompts": args.num_prompts, "min_prompts": args.min_prompts,
               "engine": {"enforce_eager": args.enforce_eager, "max_model_len": args.max_model_len, "seed": 0,
                          "disable_log_stats": False, "enable_prefix_caching": args.prefix_caching,
                          **args.engine_args}}
        job_file = out / "logs" / f"{tag}.job.json"
        write_json(job_file, job)
        self.log = open(out / "logs" / f"{tag}.log", "w")
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.lines: queue.Queue = queue.Queue()
        env = dict(os.environ)
        if args.profile_cache == "new":  # each engine starts with an empty policy-profile cache
            env["VLLM_MEDUSA_CACHE_DIR"] = str(out / "profiles" / tag)
        else:
            env["VLLM_MEDUSA_CACHE_DIR"] = str(Path(args.profile_cache).resolve())
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        self.info: dict = {}
        self.error: str | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith((READY, RESULT)):
                self.lines.put(line)
            else:
                self.log.write(line)
                self.tail.append(line)
        self.lines.put(None)

    def _wait(self, prefix: str, timeout: float | None) -> dict | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = None
            self.error = f"no answer within {timeout} s; last log lines:\n" + "".join(self.tail)
        if line is None:
            self.error = self.error or (f"exit code {self.proc.poll()}; last log lines:\n" + "".join(self.tail))
            self.close()
            return None
        return json.loads(line[len(prefix):])

    def ready(self, timeout: float | None) -> None:
        info = self._wait(READY, timeout)
        if info is not None:
            self.info = info

    def run(self, cmd: dict, timeout: float | None) -> dict | None:
        if self.error:
            return None
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        return self._wait(RESULT, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):  # the engine-core grandchild, if left
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def method_groups(methods: list[Method], size: int) -> list[list[Method]]:
    """Methods in groups of at most ``size`` engines alive at once; plain joins every group so each
    method's ratio is taken against plain decoding measured alongside it."""
    plain = next((m for m in methods if m.name == "plain"), None)
    others = [m for m in methods if m is not plain]
    if plain is None:
        return [others[i:i + size] for i in range(0, len(others), size)] or [[]]
    per = max(size - 1, 1)
    return [[plain, *others[i:i + per]] for i in range(0, len(others), per)] or [[plain]]


def run_group(group: list[Method], gid: int, args: argparse.Namespace, model: str, out: Path, bar: Any,
              meta: dict) -> list[dict]:
    """Start the group's engines (one at a time), then run every configuration on each engine in
    turn, the order rotating with the repeat, so drifts of a shared machine hit all methods alike."""
    engines = []
    for m in group:
        e = Engine(m, gid, args, model, out)
        e.ready(args.method_timeout)  # starts are sequential: engines never load concurrently
        engines.append(e)
    runs = []
    try:
        for b in parse_batches(args.batch_sizes):
            for t in parse_list(args.temperatures, float):
                for r in range(args.repeats):
                    k = r % len(engines)
                    for e in engines[k:] + engines[:k]:
                        res = e.run({"batch_size": b, "temperature": t, "repeat": r}, args.method_timeout)
                        if res is not None:
                            runs.append(res)
                        bar.update(1)
    finally:
        for e in engines:
            if e.info:
                meta.setdefault("vllm_version", e.info.get("vllm_version"))
                meta.setdefault("engine_start_s", {})[f"{e.method.name}.g{gid}"] = e.info.get("engine_start_s")
            if e.error is None:
                e.close()
            e.method.error = e.method.error or e.error
            e.log.close()
    return runs


def run_cold(methods: list[Method], args: argparse.Namespace, model: str, out: Path, bar: Any,
             meta: dict) -> list[dict]:
    """A fresh engine for every configuration, repeat and method (one alive at a time, no warm-up),
    the methods' order rotating with the repeat."""
    runs = []
    for b in parse_batches(args.batch_sizes):
        for t in parse_list(args.temperatures, float):
            for r in range(args.repeats):
                k = r % len(methods)
                for m in methods[k:] + methods[:k]:
                    e = Engine(m, f"cold-b{b}-t{t:g}-r{r}", args, model, out, mode="cold")
                    e.ready(args.method_timeout)
                    if e.info:
                        meta.setdefault("vllm_version", e.info.get("vllm_version"))
                        meta.setdefault("engine_start_s", {})[f"{m.name}.{e.group}"] = e.info.get("engine_start_s")
                    res = e.run({"batch_size": b, "temperature": t, "repeat": r}, args.method_timeout)
                    if res is not None:
                        res["group"] = "cold"  # every cold run's ratio is to all cold plain runs
                        runs.append(res)
                    if e.error is None:
                        e.close()
                    m.error = m.error or e.error
                    e.log.close()
                    bar.update(1)
    return runs


def summarize(methods: list[Method], runs: list[dict]) -> list[dict]:
    """One row per (method, batch size, temperature): medians over repeats, summed counters."""
    nodes = {m.name: m.nodes for m in methods}
    depth = {m.name: m.depth for m in methods}
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in runs:
        groups[(r.get("mode", "warm"), r["method"], r["batch_size"], r["temperature"])].append(r)
    rows = []
    for (mode, name, b, t), rs in groups.items():
        drafts = sum(r["drafts"] for r in rs)
        accepted = sum(r["accepted"] for r in rs)
        per_pos = [0] * depth[name]  # vLLM's vector has a slot per draft token, a tree only `depth`
        for r in rs:
            per_pos = add_lists(per_pos, r["per_pos"][: depth[name]])
        row = {"mode": mode, "method": name, "nodes": nodes[name], "depth": depth[name], "temperature": t, "batch_size": b, "repeats": len(rs),
               "tokens_per_s": median([r["tokens_per_s"] for r in rs]),
               "tpot_ms": median([r["tpot_ms"] for r in rs]),
               "output_tokens": median([r["output_tokens"] for r in rs]),
               "drafts": drafts, "accepted": accepted,
               "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
               "acceptance_per_depth": [x / drafts for x in per_pos] if drafts else [],
               # vLLM's own "draft acceptance rate": accepted / proposed; for a tree this is
               # accepted / nodes, low by design (see README).
               "vllm_draft_acceptance_rate": accepted / (drafts * nodes[name]) if drafts and nodes[name] else None}
        med = [r["medusa"] for r in rs if "medusa" in r]
        if med:
            steps = sum(m["tree_steps"] for m in med)
            row["medusa_nodes_per_step"] = sum(m["nodes"] for m in med) / steps if steps else 0.0
            row["medusa_mean_acceptance_length"] = 1 + sum(m["accepted_tokens"] for m in med) / steps if steps else None
            row["medusa_non_leftmost"] = sum(m["non_leftmost"] for m in med) / steps if steps else None
        explored = [r["exploration"] for r in rs if r.get("exploration") and r.get("mode") == "cold"]
        if explored:  # a cold engine's whole life is the run: the share of its time spent probing
            row["explore_fraction"] = median([e["fraction"] for e in explored])
        rows.append(row)
    # Each method's ratio is to the plain runs of its own group (measured interleaved with it).
    plain_tps: dict[tuple, list[float]] = collections.defaultdict(list)
    method_groups_of: dict[tuple, set] = collections.defaultdict(set)
    for r in runs:
        mode = r.get("mode", "warm")
        method_groups_of[(mode, r["method"])].add(r.get("group", 0))
        if r["method"] == "plain":
            plain_tps[(mode, r.get("group", 0), r["batch_size"], r["temperature"])].append(r["tokens_per_s"])
    first = {(r.get("mode", "warm"), r["method"], r["batch_size"], r["temperature"]): r["output_hashes"]
             for r in runs if r["repeat"] == 0}
    for row in rows:
        mode, key = row["mode"], (row["batch_size"], row["temperature"])
        base = [x for g in method_groups_of[(mode, row["method"])] for x in plain_tps.get((mode, g, *key), [])]
        row["plain_tokens_per_s"] = median(base) if base else None
        row["speedup"] = row["tokens_per_s"] / row["plain_tokens_per_s"] if base else None
        if base and row["temperature"] == 0 and (mode, "plain", *key) in first:
            mine, ref = first[(mode, row["method"], *key)], first[(mode, "plain", *key)]
            row["greedy_same_as_plain"] = sum(a == b for a, b in zip(mine, ref)) / len(ref)
    order = {m.name: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (r["mode"], r["temperature"], batch_key(r["batch_size"]), order[r["method"]]))
    return rows


def cold_warm_table(rows: list[dict]) -> str:
    """Greedy x plain, cold and warm side by side, per method and batch size."""
    greedy = [r for r in rows if r["temperature"] == 0 and r["method"] != "plain"]
    if {r["mode"] for r in greedy} != {"cold", "warm"}:
        return ""
    cell = {(r["mode"], r["method"], r["batch_size"]): r for r in greedy}
    batches = sorted({r["batch_size"] for r in greedy}, key=batch_key)
    body = []
    for m in dict.fromkeys(r["method"] for r in greedy):
        line = [m]
        for b in batches:
            for mode in ("cold", "warm"):
                r = cell.get((mode, m, b))
                line.append(f"{r['speedup']:.2f}x" if r and r["speedup"] else "-")
        body.append(line)
    header = ["method"] + [f"{'b' if isinstance(b, int) else ''}{b} {mode}" for b in batches for mode in ("cold", "warm")]
    return md_table(header, body)


def table(rows: list[dict]) -> str:
    header = ["mode", "method", "nodes", "temp", "batch", "tok/s", "TPOT ms", "plain tok/s (group)", "x plain", "acc. len",
              "acc. rate per depth", "tree nodes/step", "greedy = plain",
              "probing share"]
    body = [[r["mode"], r["method"], r["nodes"], r["temperature"], r["batch_size"], round(r["tokens_per_s"], 1),
             r["tpot_ms"], r.get("plain_tokens_per_s"), r["speedup"], r["mean_acceptance_length"],
             " / ".join(f"{x:.2f}" for x in r["acceptance_per_depth"]) or "-",
             r.get("medusa_nodes_per_step"), r.get("greedy_same_as_plain"), r.get("explore_fraction")]
            for r in rows]
    return md_table(header, body)


def plots(rows: list[dict], out: Path) -> list[Path]:
    """speedup.png: x plain vs batch size (greedy); acceptance.png: acceptance rate per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    temps = sorted({r["temperature"] for r in rows})
    greedy = 0.0 if 0.0 in temps else temps[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in modes:
        for m in methods:
            pts = [(r["batch_size"], r["speedup"]) for r in rows if r["method"] == m and r["mode"] == mode
                   and r["temperature"] == greedy and r["speedup"] is not None and isinstance(r["batch_size"], int)]
            if m != "plain" and pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if mode == "cold" else "-",
                        label=f"{m} ({mode})" if len(modes) > 1 else m)
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="plain")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch_size"] for r in rows if isinstance(r["batch_size"], int)})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s relative to plain")
    ax.set_title(f"Speed-up over plain decoding (temperature {greedy:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(temps), figsize=(5.2 * len(temps), 4.0), squeeze=False)
    for ax, t in zip(axes[0], temps):
        for m in methods:
            rs = [r for r in rows if r["method"] == m and r["temperature"] == t and r["drafts"]]
            drafts = sum(r["drafts"] for r in rs)
            if not drafts:
                continue
            per = [0]
            for r in rs:
                per = add_lists(per, [x * r["drafts"] for x in r["acceptance_per_depth"]])
            ax.plot(range(1, len(per) + 1), [x / drafts for x in per], marker="o", label=m)
        ax.set_xlabel("depth (draft position)")
        ax.set_ylabel("fraction of steps accepting this depth")
        ax.set_title(f"Acceptance per depth, temperature {t:g}, all batch sizes")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    plt.close(fig)
    return [out / "speedup.png", out / "acceptance.png"]


def main() -> None:
    args = parse_args()
    if args.concurrent > 1 and not args.worker:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # several engines share the memory
    setup_env()
    if args.worker:
        try:
            worker(args.worker)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        return
    from tqdm import tqdm

    model = args.model or default_model()
    heads = args.heads or default_heads()
    out = results_dir(args.out, args.name)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    needs_heads = any(n not in ("plain", "ngram") for n in names)
    base, base_src = base_tree(heads, args.tree) if needs_heads else ([], "")
    chain_heads = args.chain_heads or chain_heads_for(heads)
    methods = [make_method(n, model, heads, base, base_src, chain_heads) for n in names]
    configs = len(parse_batches(args.batch_sizes)) * len(parse_list(args.temperatures, float)) * args.repeats
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"cold", "warm"} or not modes:
        raise SystemExit(f"--modes takes cold, warm or both, got {args.modes!r}")
    meta = {"args": vars(args), "model": model, "heads": heads, "chain_heads": chain_heads, "base_tree": base, "base_tree_source": base_src,
            "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runs: list[dict] = []
    groups = method_groups(methods, args.concurrent)
    meta["groups"] = [[m.name for m in g] for g in groups]
    total = (len(methods) * configs if "cold" in modes else 0) + (
        sum(len(g) for g in groups) * configs if "warm" in modes else 0)
    with tqdm(total=total, unit="run", desc="offline") as bar:
        if "cold" in modes:
            bar.set_postfix_str("cold")
            runs += run_cold(methods, args, model, out, bar, meta)
        if "warm" in modes:
            for gid, group in enumerate(groups):
                bar.set_postfix_str(",".join(m.name for m in group))
                runs += run_group(group, gid, args, model, out, bar, meta)
    for m in methods:
        if m.error:
            tqdm.write(f"{m.name} failed: {m.error.strip().splitlines()[-1]}")
    rows = summarize(methods, runs)
    meta["methods"] = methods
    write_json(out / "raw.json", {"meta": meta, "runs": runs})
    write_json(out / "summary.json", {"meta": meta, "rows": rows})
    failed = "".join(f"- {m.name} failed: {m.error.strip().splitlines()[-1]}\n" for m in methods if m.error)
    text = (f"# Offline benchmark ({meta['started']})\n\nmodel `{Path(model).name}`, heads `{heads}`"
            f"{chain_heads_note(heads, chain_heads, names)}, "
            + (f"base tree {base_src} ({len(base)} nodes), " if base else "") + f"max_tokens {args.max_tokens}, "
            f"{args.repeats} repeat(s), median tokens/s; MT-Bench first turns.\n\n"
            + (f"Greedy, x plain decoding, cold (fresh engine, nothing excluded) and warm:\n\n{cw}\n"
               if (cw := cold_warm_table(rows)) else "")
            + table(rows) + ("\n" + failed if failed else ""))
    (out / "table.md").write_text(text)
    pngs = plots(rows, out) if rows else []
    copy_latest([out / "table.md", out / "summary.json", *pngs], args.latest)
    print(text)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
