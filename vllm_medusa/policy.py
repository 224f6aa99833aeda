"""How many tree nodes each request gets per step, so speculation never slows a busy batch.

A step that feeds T tokens to the model costs about ``base`` until the hardware's knee, then
``per_token`` more for each token beyond it (measured: ~31 ms flat up to ~6 tokens, then ~4 ms per
token for SmolLM2 on a 2-core CPU). Speculating adds the heads (``draft``, about one extra read of
the vocab projection) and, for branching trees, the tree pass of attention (``per_node`` for each
node of each request). With B requests each verifying n nodes the step emits ``B * E(n)`` tokens,
where E(n) is the expected acceptance length of the first n nodes of the tree. The policy picks the
n (0 = no speculation) that maximises tokens per second for the current B.

E(n) starts from the heads' measured accuracies (``accuracies.json``) and is corrected online by
what the engine actually accepts, since independent-head estimates run optimistic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

from vllm_medusa.trees import MedusaTree, expected_acceptance_length

# Accuracy guess used when the heads ship no accuracies.json: a typical Medusa-1 small model.
_FALLBACK_ACCURACIES = [[0.5, 0.12, 0.05, 0.03], [0.3, 0.1, 0.05, 0.03], [0.2, 0.08, 0.04, 0.02],
                        [0.15, 0.06, 0.03, 0.02], [0.12, 0.05, 0.03, 0.02]]


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per forward step: tokens in the step, plus the cost of speculating at all."""

    base: float = 0.031
    knee: int = 6
    per_token: float = 0.004
    draft: float = 0.006
    per_node: float = 0.0006

    def cost(self, tokens: int) -> float:
        return self.base + self.per_token * max(0, tokens - self.knee)

    def step(self, batch: int, nodes: int, branching: bool) -> float:
        """A step of ``batch`` requests verifying ``nodes`` nodes each."""
        t = self.cost(batch * (nodes + 1))
        if nodes:
            t += self.draft + (self.per_node * batch * nodes if branching else 0.0)
        return t

    @staticmethod
    def from_file(path: str) -> "StepCostModel":
        with open(path) as f:
            data = json.load(f)
        known = {k: data[k] for k in ("base", "knee", "per_token", "draft", "per_node") if k in data}
        return StepCostModel(**known)

    @staticmethod
    def default() -> "StepCostModel":
        """From ``$VLLM_MEDUSA_COST_PROFILE`` (a JSON written by ``bench/calibrate.py``) if set."""
        path = os.environ.get("VLLM_MEDUSA_COST_PROFILE")
        return StepCostModel.from_file(path) if path else StepCostModel()


@dataclass
class TreeBudgetPolicy:
    tree: MedusaTree
    accuracies: Sequence[Sequence[float]]
    cost: StepCostModel = field(default_factory=StepCostModel.default)
    adaptive: bool = True
    refresh_every: int = 256  # tree steps between re-estimates from observed acceptance
    _memo: dict[int, int] = field(default_factory=dict, repr=False)
    _observed: dict[int, list[float]] = field(default_factory=dict, repr=False)
    _since_refresh: int = 0
    _scale: float = 1.0

    @staticmethod
    def for_tree(tree: MedusaTree, accuracies: Sequence[Sequence[float]] | None,
                 adaptive: bool = True, cost: StepCostModel | None = None) -> "TreeBudgetPolicy":
        return TreeBudgetPolicy(tree, accuracies or _FALLBACK_ACCURACIES,
                                cost or StepCostModel.default(), adaptive)

    def predicted_length(self, num_nodes: int) -> float:
        return expected_acceptance_length(self.tree.truncate(num_nodes), self.accuracies)

    def expected_length(self, num_nodes: int) -> float:
        """Predicted acceptance length, with its speculative part scaled by observation."""
        if num_nodes == 0:
            return 1.0
        return 1.0 + (self.predicted_length(num_nodes) - 1.0) * self._scale

    def throughput(self, batch: int, num_nodes: int) -> float:
        """Expected tokens per second with ``num_nodes`` nodes for each of ``batch`` requests."""
        branching = not self.tree.truncate(num_nodes).is_chain
        return batch * self.expected_length(num_nodes) / self.cost.step(batch, num_nodes, branching)

    def num_nodes(self, batch: int) -> int:
        """Nodes per request for a step with ``batch`` decoding requests."""
        if not self.adaptive:
            return self.tree.num_nodes
        batch = max(batch, 1)
        if batch not in self._memo:
            self._memo[batch] = max(range(self.tree.num_nodes + 1),
                                    key=lambda n: (self.throughput(batch, n), -n))
        return self._memo[batch]

    def observe(self, num_nodes: int, accepted: int) -> None:
        """One verified tree of ``num_nodes`` nodes accepted ``accepted`` of them."""
        if num_nodes == 0:
            return
        stat = self._observed.setdefault(num_nodes, [0.0, 0.0])
        stat[0] += accepted
        stat[1] += 1
        self._since_refresh += 1
        if self._since_refresh >= self.refresh_every:
            self._refresh()

    def _refresh(self) -> None:
        seen = sum(acc for acc, _ in self._observed.values())
        predicted = sum((self.predicted_length(n) - 1.0) * cnt for n, (_, cnt) in self._observed.items())
        if predicted > 0:
            self._scale = min(max(seen / predicted, 0.05), 2.0)
        self._since_refresh = 0
        self._memo.clear()
