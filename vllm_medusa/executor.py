"""Drafts delivered with the step's output instead of by a second RPC.

With synchronous scheduling vLLM's engine core asks the workers for the next drafts after every step
(``post_step`` -> ``take_draft_token_ids``), a second round trip through the multiprocess executor's
message queues on the critical path of every step, drafts or not. The Medusa runner already has the
drafts when ``sample_tokens`` returns, so it attaches them to the ``ModelRunnerOutput``
(``DRAFTS_ATTR``) and this executor hands those to the engine core. Outputs without them (another
runner, a non-blocking call) fall back to the RPC.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.executor.multiproc_executor import MultiprocExecutor

EXECUTOR_CLASS = "vllm_medusa.executor.MedusaMultiprocExecutor"
DRAFTS_ATTR = "medusa_draft_token_ids"
_NONE = object()


class MedusaMultiprocExecutor(MultiprocExecutor):
    """vLLM's multiprocess executor, minus the per-step ``take_draft_token_ids`` round trip."""

    _medusa_drafts: Any = _NONE

    def sample_tokens(self, grammar_output, non_block: bool = False):
        output = super().sample_tokens(grammar_output, non_block)
        self._medusa_drafts = _NONE if non_block else getattr(output, DRAFTS_ATTR, _NONE)
        return output

    def take_draft_token_ids(self):
        drafts, self._medusa_drafts = self._medusa_drafts, _NONE
        return super().take_draft_token_ids() if drafts is _NONE else drafts
