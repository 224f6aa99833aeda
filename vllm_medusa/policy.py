"""How many tree nodes each request gets per step, so speculation never slows a busy batch.

A step that feeds T tokens to the model costs about ``base`` until the hardware's knee, then
``per_token`` more for each token beyond it (measured: ~31 ms flat up to ~6 tokens, then ~4 ms per
token for SmolLM2 on a 2-core CPU). With B requests each verifying n nodes the step emits
``B * E(n)`` tokens, where E(n) is the expected acceptance length of the first n nodes of the tree
under the heads' measured accuracies. The policy picks the n (0 = no speculation) that maximises
tokens per second for the current B.
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
    """Seconds per forward step as a function of the number of tokens in it."""

    base: float = 0.031
    knee: int = 6
    per_token: float = 0.004

    def cost(self, tokens: int) -> float:
        return self.base + self.per_token * max(0, tokens - self.knee)

    @staticmethod
    def from_file(path: str) -> "StepCostModel":
        with open(path) as f:
            data = json.load(f)
        return StepCostModel(float(data["base"]), int(data["knee"]), float(data["per_token"]))

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
    _memo: dict[int, int] = field(default_factory=dict, repr=False)

    @staticmethod
    def for_tree(tree: MedusaTree, accuracies: Sequence[Sequence[float]] | None,
                 adaptive: bool = True, cost: StepCostModel | None = None) -> "TreeBudgetPolicy":
        return TreeBudgetPolicy(tree, accuracies or _FALLBACK_ACCURACIES,
                                cost or StepCostModel.default(), adaptive)

    def expected_length(self, num_nodes: int) -> float:
        return expected_acceptance_length(self.tree.truncate(num_nodes), self.accuracies)

    def throughput(self, batch: int, num_nodes: int) -> float:
        """Expected tokens per second with ``num_nodes`` nodes for each of ``batch`` requests."""
        return batch * self.expected_length(num_nodes) / self.cost.cost(batch * (num_nodes + 1))

    def num_nodes(self, batch: int) -> int:
        """Nodes per request for a step with ``batch`` decoding requests."""
        if not self.adaptive:
            return self.tree.num_nodes
        batch = max(batch, 1)
        if batch not in self._memo:
            self._memo[batch] = max(range(self.tree.num_nodes + 1),
                                    key=lambda n: (self.throughput(batch, n), -n))
        return self._memo[batch]
