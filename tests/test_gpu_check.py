"""`python -m vllm_medusa.gpu_check`: on this CPU through Triton's interpreter (--quick, correctness
only); on a GPU it also compiles for the device and prints the timing table."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import runpy, sys
sys.argv = ["gpu_check", "--quick"]
try:
    runpy.run_module("vllm_medusa.gpu_check", run_name="__main__")
    rc = 0
except SystemExit as exc:
    rc = exc.code
print("vllm imported:", any(m == "vllm" or m.startswith("vllm.") for m in sys.modules))
sys.exit(rc)
"""


def test_gpu_check_runs_without_vllm():
    env = dict(os.environ)  # without CUDA the script switches to the interpreter by itself
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "vllm imported: False" in out
    for case in ("bf16-d64-b16-gqa", "fp32-d64-b32-gqa", "fp16-d64-b16"):
        assert case in out
    assert "MISMATCH" not in out and "within tolerance" in out


def test_gpu_check_fails_on_a_mismatch(monkeypatch, capsys):
    from vllm_medusa import gpu_check
    from vllm_medusa.kernels import tree_attention_triton

    def wrong(q, *args, out=None, **kwargs):  # zeros instead of attention
        out.zero_()
        return out

    monkeypatch.setattr(tree_attention_triton, "tree_attention_paged", wrong)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--quick"]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "exceed their tolerance" in captured.err
