"""The benchmark scripts run end to end (`--smoke`) and write the files the README promises.

Only structure is checked, never timings: the numbers of a smoke run on a shared CPU mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo heads when they exist, else random 4-head ones (acceptance ~0, fine for structure)."""
    import torch

    from vllm_medusa.demo import demo_heads_path
    from vllm_medusa.heads import MedusaHeads, save_medusa_heads

    path = demo_heads_path()
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    random_heads = MedusaHeads(4, 1, 576, 49152, shared_lm_head=True)
    with torch.no_grad():
        random_heads.block_weight.normal_(0, 0.02)
    return save_medusa_heads(random_heads, tmp_path_factory.mktemp("heads"), "smollm2",
                             dtype=torch.bfloat16)


def run(script: str, out: Path, heads: Path, *extra: str) -> str:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", "--out", str(out),
                           "--heads", str(heads), *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.engine
def test_offline_smoke(tmp_path: Path, heads: Path) -> None:
    run("offline.py", tmp_path, heads)
    for name in ("raw.json", "summary.json", "table.md", "speedup.png", "acceptance.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["rows"]
    assert {r["method"] for r in rows} == {"plain", "tree-4"}
    assert {(r["batch_size"], r["temperature"]) for r in rows} == {(b, t) for b in (1, 2) for t in (0.0, 0.7)}
    assert not any(m["error"] for m in summary["meta"]["methods"])
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["output_tokens"] > 0 and r["speedup"] is not None
        if r["method"] == "tree-4":
            assert r["drafts"] > 0 and r["mean_acceptance_length"] >= 1
            assert len(r["acceptance_per_depth"]) >= 1 and r["medusa_nodes_per_step"] > 0
        if r["temperature"] == 0:
            assert 0 <= r["greedy_same_as_plain"] <= 1
    table = (tmp_path / "table.md").read_text()
    for column in ("method", "tok/s", "TPOT ms", "x plain", "acc. len", "acc. rate per depth"):
        assert f"| {column} |" in table or f" {column} |" in table, column


@pytest.mark.engine
def test_offline_cold_smoke(tmp_path: Path, heads: Path) -> None:
    """Cold mode: a fresh engine per run, the shifting load, a per-engine profile cache."""
    run("offline.py", tmp_path, heads, "--modes", "cold", "--batch-sizes", "shift",
        "--temperatures", "0", "--methods", "plain,adaptive")
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert {(r["mode"], r["method"], r["batch_size"]) for r in rows} == {
        ("cold", "plain", "shift"), ("cold", "adaptive", "shift")}
    raw = json.loads((tmp_path / "raw.json").read_text())["runs"]
    assert all(r["output_tokens"] > 0 for r in raw)
    adaptive = next(r for r in raw if r["method"] == "adaptive")
    assert 0 <= adaptive["exploration"]["fraction"] <= 1
    assert list((tmp_path / "profiles").rglob("profile-*.json")), "the engine saved its profile"


@pytest.mark.engine
def test_online_smoke(tmp_path: Path, heads: Path) -> None:
    run("online.py", tmp_path, heads)
    for name in ("online_raw.json", "online_summary.json", "online.md", "online.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "online_summary.json").read_text())
    assert not summary["meta"]["errors"]
    rows = {r["server"]: r for r in summary["rows"]}
    assert set(rows) == {"plain", "medusa_tree"}
    for r in rows.values():
        assert r["completed"] == 2 and r["failed"] == 0
        assert r["throughput_tok_s"] > 0 and r["ttft_ms_median"] > 0
    assert 0 <= rows["medusa_tree"]["same_text_as_plain"] <= 1
    assert rows["medusa_tree"]["mean_acceptance_length"] >= 1
    assert "TPOT ms p50" in (tmp_path / "online.md").read_text()


@pytest.mark.engine
def test_learning_curve_smoke(tmp_path: Path) -> None:
    """Tiny model, synthetic answers: every (size, targets, mode) point is trained, evaluated on the
    tiny model's MT-Bench answers and lands in the JSON, the table and the plot; a rerun skips them.
    A chained point trains on only the answers added since the previous one; path-conditioned heads
    are a point of their own."""
    import torch

    from tests.test_training import synthetic_records
    from vllm_medusa.demo import tiny_model_path
    from vllm_medusa.train.features import extract_features

    tiny = tiny_model_path()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(n=24)))
    feats = extract_features(tiny, data, tmp_path / "features", dtype=torch.float32, shard_size=8)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [sys.executable, str(REPO / "bench" / "learning_curve.py"), "--model", str(tiny),
           "--data", f"syn={feats}", "--sizes", "200,500,1M", "--targets", "hard,soft",
           "--modes", "scratch,chained",
           "--eval-dir", str(tmp_path / "eval"), "--eval-max-tokens", "8", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points = json.loads((tmp_path / "out" / "learning_curve.json").read_text())["points"]
    assert {(q["targets"], q["mode"], q["size"]) for q in points} == {
        (t, m, s) for t in ("hard", "soft") for m in ("scratch", "chained") for s in (200, 500)}
    assert "fewer than 1000000: skipped" in proc.stdout
    for q in points:
        assert q["train_positions"] > 0 and len(q["top1"]) == 5 and q["per_step_16"] >= 1.0
    def point(targets, mode, size):
        return next(q for q in points if (q["targets"], q["mode"], q["size"]) == (targets, mode, size))

    for t in ("hard", "soft"):
        assert point(t, "scratch", 200)["train_positions"] < point(t, "scratch", 500)["train_positions"]
        assert point(t, "chained", 200)["top1"] == point(t, "scratch", 200)["top1"]
        assert point(t, "chained", 500)["answer_tokens"] == point(t, "scratch", 500)["answer_tokens"]
        assert point(t, "chained", 500)["train_positions"] < point(t, "scratch", 500)["train_positions"]
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 0
    assert "| syn | soft | chained |" in (tmp_path / "out" / "learning_curve.md").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads((tmp_path / "out" / "learning_curve.json").read_text())["points"] == points
    path = subprocess.run(cmd[:cmd.index("--sizes")] + ["--sizes", "200", "--conditioning", "path"]
                          + cmd[cmd.index("--eval-dir"):], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert path.returncode == 0, path.stdout[-3000:] + path.stderr[-3000:]
    added = json.loads((tmp_path / "out" / "learning_curve.json").read_text())["points"][len(points):]
    assert [(q["conditioning"], q["targets"], q["size"]) for q in added] == [("path", "hard", 200)]
    assert "| syn | hard | scratch | path |" in (tmp_path / "out" / "learning_curve.md").read_text()


def test_tree_pass_smoke(tmp_path: Path) -> None:
    """bench/tree_pass.py times both reads of the packed cache for every configuration and writes
    its table (no timings are checked)."""
    pytest.importorskip("vllm._custom_ops")
    out = tmp_path / "tree_pass.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "tree_pass.py"), "--contexts", "60,200",
                           "--requests", "1,3", "--seconds", "0.01", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 2 * 2  # header + trees x contexts x requests
    assert all(line.endswith("x |") for line in rows[1:])
