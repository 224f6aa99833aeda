"""The Medusa tree drafter: heads on the last accepted hidden state -> one tree of tokens per request.

vLLM creates it through ``SpeculativeConfig(method="custom_class")`` and calls ``load_model`` with
the target model. vLLM's custom-proposer interface hands a drafter token ids only, so the Medusa
runner (``runner.py``) calls :meth:`propose_trees` with the hidden states instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vllm_medusa.config import ADDITIONAL_CONFIG_KEY, MedusaOptions
from vllm_medusa.heads import MedusaHeads, load_medusa_heads
from vllm_medusa.lookup import BranchStats, continuation, longest_repeat
from vllm_medusa.policy import StepCostModel, TreeBudgetPolicy
from vllm_medusa.profile_store import ProfileStore, files_digest, hardware_id
from vllm_medusa.trees import MedusaTree, merge_branch, resolve_tree

logger = logging.getLogger(__name__)

# Per speculative step, Python outside the heads and the forward pass (tree rows, the tree walk,
# compaction, bookkeeping): ~2 ms at batch 1 on a 2-core CPU; start-up does not measure it.
_BOOKKEEPING_S = 0.002


def heads_default_tree(heads_path: str) -> list | None:
    """The tree calibrated for these heads (``tree.json`` beside them), if any."""
    folder = Path(heads_path)
    folder = folder if folder.is_dir() else folder.parent
    tree_file = folder / "tree.json"
    return json.loads(tree_file.read_text()) if tree_file.is_file() else None


def heads_accuracies(heads_path: str) -> list[list[float]] | None:
    folder = Path(heads_path)
    folder = folder if folder.is_dir() else folder.parent
    f = folder / "accuracies.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return data.get("per_rank", data) if isinstance(data, dict) else data


def draft_tree_tokens(topk_ids: torch.Tensor, tree: MedusaTree) -> torch.Tensor:
    """``topk_ids [K, B, k]`` -> ``[B, num_nodes]``: node ``(i1..id)`` holds head d-1's i_d-th guess."""
    if tree.num_nodes == 0:
        return topk_ids.new_empty((topk_ids.shape[1], 0))
    depth_idx = torch.tensor(tree.depths[1:], device=topk_ids.device) - 1
    rank_idx = torch.tensor(tree.ranks[1:], device=topk_ids.device)
    return topk_ids[depth_idx, :, rank_idx].t()


class MedusaTreeProposer:
    """Drafts a Medusa tree per request; the runner verifies it."""

    def __init__(self, vllm_config, device: torch.device | str | None = None):
        raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            raise RuntimeError("MedusaTreeProposer needs additional_config['medusa_tree']; use "
                               "speculative_config={'method': 'medusa_tree', ...}")
        self.options = MedusaOptions.from_dict(raw)
        self.vllm_config = vllm_config
        self.device = device
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.heads: MedusaHeads | None = None
        self.lm_head_weight: torch.Tensor | None = None
        self.draft_projection: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.embed_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.tree: MedusaTree | None = None
        self.policy: TreeBudgetPolicy | None = None
        self.store: ProfileStore | None = None
        self.needs_calibration = False  # no saved or given step-cost profile: measure one at start
        self._saved_at = 0.0
        self.branch_stats = (BranchStats(self.options.lookup, self.options.lookup_min,
                                         self.options.lookup_max) if self.options.lookup else None)

    def load_model(self, target_model: torch.nn.Module) -> None:
        model_config = self.vllm_config.model_config
        hidden = model_config.get_hidden_size()
        vocab = model_config.get_vocab_size()
        dtype = model_config.dtype
        device = next(target_model.parameters()).device
        self.heads = load_medusa_heads(self.options.heads, hidden_size=hidden, vocab_size=vocab,
                                       dtype=dtype, device=device).eval()
        # Shared heads project with the model's own logits path (vLLM's packed GEMM on CPU; every
        # tensor-parallel rank gets the whole vocab), or, with a draft vocabulary (token_map), with
        # the lm_head rows of that vocabulary only. With tensor parallelism the lm_head is sliced
        # by vocab: a local projection needs it gathered, and only then is it kept.
        self.compute_logits = getattr(target_model, "compute_logits", None)
        if self.heads.shared_lm_head:
            tp = self.vllm_config.parallel_config.tensor_parallel_size
            if self.heads.token_map is not None:
                # vLLM may pad the vocab rows of its lm_head; padded rows must never be drafted.
                weight = full_vocab_rows(target_model.lm_head.weight, tp)[:vocab]
                self.draft_projection = draft_vocab_projection(weight, self.heads.token_map)
                self.lm_head_weight = weight if tp == 1 else None
            elif tp == 1 or self.compute_logits is None:
                self.lm_head_weight = full_vocab_rows(target_model.lm_head.weight, tp)[:vocab]
        if self.heads.token_conditioned:
            self.embed_tokens = input_embedding(target_model)
        self.tree = resolve_medusa_tree(self.options, self.heads.num_heads)
        self.policy = TreeBudgetPolicy.for_tree(self.tree, heads_accuracies(self.options.heads),
                                                adaptive=self.options.adaptive,
                                                num_heads=self.heads.num_heads)
        if self.options.adaptive:
            self._restore_profile(device)
        logger.info("Medusa tree drafter: %s, tree of %d nodes (depth %d), acceptance=%s, adaptive=%s",
                    self.heads.extra_repr(), self.tree.num_nodes, self.tree.depth,
                    self.options.acceptance, self.options.adaptive)

    # -- the policy's profile on disk (profile_store.py) -----------------------------------------
    def profile_key(self, device: torch.device | str) -> dict:
        """What the step costs and measured rates depend on."""
        import vllm

        cfg = self.vllm_config
        return {"model": cfg.model_config.model, "revision": cfg.model_config.revision,
                "dtype": str(cfg.model_config.dtype), "heads": os.path.abspath(self.options.heads),
                "heads_digest": files_digest(self.options.heads), "tree": [list(p) for p in self.tree.paths],
                "options": {k: v for k, v in self.options.to_dict().items() if k != "heads"},
                "hardware": hardware_id(str(device)), "vllm": vllm.__version__,
                "tensor_parallel": cfg.parallel_config.tensor_parallel_size,
                "compilation_mode": str(cfg.compilation_config.mode),
                "cost_profile_env": os.environ.get("VLLM_MEDUSA_COST_PROFILE")}

    def _restore_profile(self, device: torch.device | str) -> None:
        """Start from the saved profile of this setup, or plan a start-up measurement."""
        assert self.policy is not None
        self.store = ProfileStore(self.profile_key(device))
        saved = self.store.load()
        explicit = bool(os.environ.get("VLLM_MEDUSA_COST_PROFILE"))
        if saved is not None:
            try:
                cost = self.policy.cost if explicit else StepCostModel.from_dict(saved["cost"])
                self.policy.load_state_dict(saved["policy"])
                self.policy.set_cost(cost)
                logger.info("Medusa policy profile loaded from %s", self.store.path)
                return
            except (ValueError, TypeError) as e:
                logger.warning("Medusa policy profile %s ignored (%s); measuring afresh", self.store.path, e)
        self.needs_calibration = not explicit

    def calibrate(self, forward_seconds: dict[int, float], draft_seconds: float,
                  tree_pass_seconds: dict[tuple[int, int], float] | None = None) -> StepCostModel:
        """Set the policy's step-cost model from start-up timings of forward passes carrying T tokens
        (``forward_seconds``), of drafting one request's tree and of the tree pass of attention for
        (requests, nodes) (``tree_pass_seconds``; the prior's figures stand without them). Saved
        with the profile."""
        assert self.policy is not None
        cost = StepCostModel.fit(forward_seconds, draft=draft_seconds + _BOOKKEEPING_S)
        if tree_pass_seconds and len(tree_pass_seconds) >= 3:
            cost = cost.fit_tree_pass(tree_pass_seconds)
        self.policy.set_cost(cost)
        self.needs_calibration = False
        logger.info("Medusa step-cost profile measured at start-up: %s", cost.to_dict())
        self.save_profile()
        return cost

    def save_profile(self) -> None:
        if self.store is not None and self.policy is not None and not self.needs_calibration:
            self.store.save(self.policy.cost.to_dict(), self.policy.state_dict())
            self._saved_at = time.monotonic()

    def maybe_save_profile(self, every_s: float = 30.0) -> None:
        """Saved every ``every_s`` seconds while serving (and at shutdown): an engine that is killed
        loses at most that much of what it learned."""
        if self.store is not None and time.monotonic() - self._saved_at > every_s:
            self.save_profile()

    def step_tree(self, num_decoding: int) -> MedusaTree:
        """The tree for the next step, from the load (the adaptive policy) or the fixed tree."""
        assert self.policy is not None
        return self.policy.choose(num_decoding)

    @torch.inference_mode()
    def propose_trees(self, hidden: torch.Tensor, tree: MedusaTree, num_nodes: Sequence[int],
                      tokens: Sequence[int] | None = None, contexts: Sequence[np.ndarray] | None = None,
                      keys: Sequence[Hashable] | None = None, rooms: Sequence[int] | None = None
                      ) -> tuple[list[list[int]], list[MedusaTree]]:
        """Per request b: draft tokens and tree, from hidden states ``[B, H]`` of the last accepted
        tokens and ``tokens[b]``, the token just produced from that state (read by token-conditioned
        heads only): the step's ``tree`` cut to ``num_nodes[b]`` nodes (what the request may still
        emit). Given the request's tokens so far (``contexts[b]``; ``keys[b]`` names the request),
        its prompt-lookup branch takes the places of less valuable nodes (``lookup.py``), and a
        valuable one may grow the tree up to ``rooms[b]`` nodes (default: the cut size). Requests
        in one batch may get trees of different sizes and shapes; the scheduler may cut each one
        shorter again (token budget, max_model_len), which keeps a valid subtree.
        """
        assert self.heads is not None
        trees = [tree.truncate(n) for n in num_nodes]
        widest = max(trees, key=lambda t: t.num_nodes, default=None)
        if widest is None or widest.num_nodes == 0:
            return [[] for _ in trees], trees
        produced = None
        if self.embed_tokens is not None:
            if tokens is None:
                raise ValueError("token-conditioned Medusa heads need the tokens just produced")
            produced = torch.as_tensor(tokens, dtype=torch.long, device=hidden.device)
        if self.heads.path_conditioned:
            tree_tokens = self._path_drafts(hidden, produced, widest)
        else:
            embeds = None if produced is None else self.embed_tokens(produced)
            tree_tokens = draft_tree_tokens(self._topk_ids(hidden, max(widest.max_topk, 1), widest.depth,
                                                           embeds), widest)
        drafts = [d[:t.num_nodes] for d, t in zip(tree_tokens.tolist(), trees)]
        if contexts is not None and self.branch_stats is not None:
            self._add_lookup_branches(widest, trees, drafts, contexts, keys,
                                      rooms if rooms is not None else num_nodes)
        return drafts, trees

    def _add_lookup_branches(self, widest: MedusaTree, trees: list[MedusaTree], drafts: list[list[int]],
                             contexts: Sequence[np.ndarray], keys: Sequence[Hashable] | None,
                             rooms: Sequence[int]) -> None:
        stats, opts, policy = self.branch_stats, self.options, self.policy
        assert stats is not None and policy is not None
        values = policy.node_values(widest)
        extend_above = policy.node_costs(len(trees), widest, opts.lookup)
        for b, context in enumerate(contexts):
            key = keys[b] if keys is not None else b
            stats.update(key, context)
            end, match = longest_repeat(context, opts.lookup_min, opts.lookup_max)
            if end < 0:
                continue
            branch = continuation(context, end, opts.lookup).tolist()
            stats.drafted(key, context, match, branch)
            trees[b], drafts[b] = merge_branch(trees[b], drafts[b], values, branch,
                                               stats.values(match).tolist(), extend_above,
                                               min(rooms[b], self.num_speculative_tokens))

    def forget(self, key: Hashable) -> None:
        """A request finished: drop what the lookup statistics keep for it."""
        if self.branch_stats is not None:
            self.branch_stats.forget(key)

    def _path_drafts(self, hidden: torch.Tensor, tokens: torch.Tensor, tree: MedusaTree) -> torch.Tensor:
        """``[B, num_nodes]`` draft tokens of path-conditioned heads: depth by depth, head d-1 guesses
        the children of every node at depth d-1 that has any, given that node's token (one batched
        call per depth)."""
        assert self.embed_tokens is not None
        b = hidden.shape[0]
        rows = torch.empty((b, tree.num_rows), dtype=torch.long, device=hidden.device)
        rows[:, 0] = tokens
        for d, (parents, kids, parent_at, ranks) in enumerate(tree.levels):
            p = len(parents)
            h = hidden.unsqueeze(1).expand(b, p, hidden.shape[-1]).reshape(b * p, -1)
            embeds = self.embed_tokens(rows[:, parents].reshape(-1))
            ids = self._topk_ids(h, max(ranks) + 1, 1, embeds, first=d).view(b, p, -1)
            rows[:, kids] = ids[:, parent_at, ranks]
        return rows[:, 1:]

    def _topk_ids(self, hidden: torch.Tensor, k: int, num_heads: int,
                  embeds: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
        """Token ids ``[num_heads, B, k]`` of the top-k guesses of heads ``first`` on."""
        heads = self.heads
        assert heads is not None
        if self.draft_projection is not None:
            x = heads.residual(hidden, num_heads, embeds, first).to(hidden.dtype)
            logits = self.draft_projection(x.reshape(-1, x.shape[-1]))
            return heads.map_tokens(logits.view(num_heads, hidden.shape[0], -1).topk(k, dim=-1).indices)
        if heads.shared_lm_head and self.compute_logits is not None:
            x = heads.residual(hidden, num_heads, embeds, first)
            logits = self.compute_logits(x.reshape(-1, x.shape[-1]).to(hidden.dtype))
            if logits is not None:
                logits = logits.view(num_heads, hidden.shape[0], -1)[..., : heads.vocab_size]
                return logits.topk(k, dim=-1).indices  # no token_map here: draft_projection has it
        return heads.topk_token_ids(hidden, k, self.lm_head_weight, num_heads=num_heads,
                                    token_embeds=embeds, first=first)

    def propose(self, *args, **kwargs):
        """vLLM's custom-proposer entry point; tree drafting needs hidden states, so refuse clearly."""
        raise RuntimeError("medusa_tree drafts from hidden states and must run in the Medusa worker "
                           "(worker_cls is set by the vllm-medusa plugin); do not use "
                           "method='custom_class' with this class directly")


def input_embedding(target_model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The base model's token embedding (vLLM's ``embed_input_ids``; ``get_input_embeddings`` in
    older releases), for token-conditioned heads."""
    for name in ("embed_input_ids", "get_input_embeddings"):
        fn = getattr(target_model, name, None)
        if callable(fn):
            return fn
    raise RuntimeError(f"token-conditioned Medusa heads need the base model's input embedding; "
                       f"{type(target_model).__name__} has no embed_input_ids")


def full_vocab_rows(weight: torch.Tensor, tensor_parallel_size: int) -> torch.Tensor:
    """The whole (padded) vocab projection on every rank: with tensor parallelism each rank holds
    an equal slice of the padded vocab rows, in rank order. Only what a local projection needs is
    gathered (the draft vocabulary's rows are taken from it afterwards)."""
    if tensor_parallel_size == 1:
        return weight
    from vllm_medusa.compat import resolve

    return resolve("tensor_model_parallel_all_gather")(weight.contiguous(), dim=0)


def draft_vocab_projection(lm_head_weight: torch.Tensor, token_map: torch.Tensor
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [M, H] -> logits [M, len(token_map)]`` over the draft vocabulary only.

    The vocab projection dominates the heads' cost and is memory-bound at decode sizes: on this CPU
    the 49k x 576 bf16 lm_head takes ~2-3.5 ms per call, its 12k rows of a draft vocabulary ~0.2-0.4 ms
    (the idea of FR-Spec / vLLM's Medusa ``token_map``). On CPU the rows are packed once for vLLM's
    GEMM (oneDNN), as vLLM does for its own linear layers; elsewhere ``F.linear`` (cuBLAS).
    """
    weight = lm_head_weight[token_map.to(lm_head_weight.device)].contiguous()
    if weight.device.type == "cpu":
        try:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        except ImportError:  # another vLLM layout: the plain GEMM is still correct
            dispatch_cpu_unquantized_gemm = None
        if dispatch_cpu_unquantized_gemm is not None:
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            return lambda x: layer.cpu_linear(x, layer.weight, None)
    return lambda x: F.linear(x, weight)


def resolve_medusa_tree(options: MedusaOptions, num_heads: int) -> MedusaTree:
    """The tree from the options, else the heads' calibrated tree, else a chain over all heads."""
    tree = resolve_tree(options.tree, num_heads=num_heads, max_topk=options.max_topk,
                        default=heads_default_tree(options.heads))
    if options.num_speculative_tokens is not None:
        tree = tree.truncate(options.num_speculative_tokens)
    return tree
