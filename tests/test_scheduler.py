"""The Medusa scheduler drops drafts only in steps that will compute a prompt."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.v1.core.sched.scheduler")

from vllm_medusa.scheduler import MedusaScheduler  # noqa: E402


class Queue(list):
    def peek_request(self):
        return self[0]


def req(computed: int, prompt: int, total: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(num_computed_tokens=computed, num_prompt_tokens=prompt,
                           num_tokens=total if total is not None else prompt)


def scheduler(running, waiting=(), free_blocks=100, max_seqs=8, holding=()):
    return SimpleNamespace(running=list(running), waiting=Queue(waiting), kv_holding_waiting=Queue(holding),
                           max_num_running_reqs=max_seqs, block_size=16,
                           kv_cache_manager=SimpleNamespace(block_pool=SimpleNamespace(
                               get_num_free_blocks=lambda: free_blocks)))


def coming(s) -> bool:
    return MedusaScheduler._medusa_prefill_coming(s)


def test_prefill_coming():
    decoding = [req(40, 30, 41), req(90, 80, 91)]
    assert not coming(scheduler(decoding))  # pure decode: drafts stay
    assert coming(scheduler(decoding, waiting=[req(0, 100)]))  # a new prompt is admitted
    assert coming(scheduler(decoding + [req(64, 300)]))  # a chunked prefill goes on
    # No seat, or no memory for the prompt (preempted requests waiting): speculation goes on.
    assert not coming(scheduler(decoding, waiting=[req(0, 100)], max_seqs=2))
    assert not coming(scheduler(decoding, waiting=[req(0, 100)], free_blocks=6))
    assert coming(scheduler(decoding, waiting=[req(0, 100)], free_blocks=7))
    # A resumed request that keeps its blocks is scheduled first.
    assert coming(scheduler(decoding, waiting=[req(0, 5000)], holding=[req(0, 100)], free_blocks=7))
