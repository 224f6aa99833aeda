"""The executor takes the drafts from the step's output, and asks the workers only without them."""

from types import SimpleNamespace

from vllm.v1.executor.multiproc_executor import MultiprocExecutor
from vllm.v1.outputs import DraftTokenIds

from vllm_medusa.executor import DRAFTS_ATTR, MedusaMultiprocExecutor


def _executor(monkeypatch, output):
    rpc_calls = []
    monkeypatch.setattr(MultiprocExecutor, "sample_tokens", lambda self, g, non_block=False: output)
    monkeypatch.setattr(MultiprocExecutor, "take_draft_token_ids",
                        lambda self: rpc_calls.append(1) or DraftTokenIds(["rpc"], [[9]]))
    return object.__new__(MedusaMultiprocExecutor), rpc_calls


def test_drafts_come_with_the_output(monkeypatch):
    drafts = DraftTokenIds(["a", "b"], [[1, 2], []])
    output = SimpleNamespace(**{DRAFTS_ATTR: drafts})
    executor, rpc_calls = _executor(monkeypatch, output)
    assert executor.sample_tokens(None) is output
    assert executor.take_draft_token_ids() is drafts
    assert not rpc_calls
    # Taken once: a later take without a new step asks the workers, as vLLM's executor would.
    assert executor.take_draft_token_ids().req_ids == ["rpc"]
    assert rpc_calls == [1]


def test_none_attached_means_no_drafts(monkeypatch):
    executor, rpc_calls = _executor(monkeypatch, SimpleNamespace(**{DRAFTS_ATTR: None}))
    executor.sample_tokens(None)
    assert executor.take_draft_token_ids() is None and not rpc_calls


def test_falls_back_to_the_rpc(monkeypatch):
    executor, rpc_calls = _executor(monkeypatch, SimpleNamespace())  # another runner's output
    executor.sample_tokens(None)
    assert executor.take_draft_token_ids().req_ids == ["rpc"]
    executor, rpc_calls = _executor(monkeypatch, SimpleNamespace(**{DRAFTS_ATTR: None}))
    executor.sample_tokens(None, non_block=True)  # a future: nothing to read yet
    assert executor.take_draft_token_ids().req_ids == ["rpc"] and rpc_calls == [1]
