"""vLLM's scheduler, except that drafts do not ride on steps that admit prefills.

A server under arrivals runs many steps that carry a new prompt (or a chunk of one) next to the
decoding requests. Such a step is already past the hardware's knee, so every draft token verified
in it costs the full marginal price of a token while bringing well under one token back; it also
delays the new request's first token. When a prefill is about to be scheduled (a waiting request
with room for it, or a prompt still being chunked) the running requests' drafts are dropped for
that step: they decode one token as plain decoding would, and the drafter proposes afresh next step.
Offline batches (all prompts admitted at once, or a full batch) are not affected.

Only the synchronous scheduler is extended: with async scheduling (GPU) the drafts live in the
worker and vLLM's ``AsyncScheduler`` is left as it is.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

SCHEDULER_CLASS = f"{__name__}.MedusaScheduler"


class MedusaScheduler(Scheduler):
    def schedule(self, *args, **kwargs):
        if self._medusa_prefill_coming():
            for request in self.running:
                if request.spec_token_ids:
                    request.spec_token_ids = []
        return super().schedule(*args, **kwargs)

    def _medusa_prefill_coming(self) -> bool:
        """A prompt will be (partly) computed this step: a chunked prefill goes on, or the next
        waiting request has a free seat and the KV blocks for its prompt. A waiting queue stuck
        on memory (preempted requests) does not count: speculation goes on while it drains."""
        if any(r.num_computed_tokens < r.num_prompt_tokens for r in self.running):
            return True
        if len(self.running) >= self.max_num_running_reqs:
            return False
        queue = next((q for q in (getattr(self, "kv_holding_waiting", None), self.waiting) if q), None)
        if queue is None:
            return False
        request = queue.peek_request()
        needed = -(-(request.num_tokens - request.num_computed_tokens) // self.block_size)
        return self.kv_cache_manager.block_pool.get_num_free_blocks() >= needed
