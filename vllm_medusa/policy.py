"""Which tree each request gets per step, so that speculation never slows a busy batch.

Candidates are "no speculation", chains along the heads' top-1 guesses (no tree pass of attention
needed) and the first n nodes of the tree for a few n. A step of B decoding requests, each verifying
a candidate tree t, emits ``B * E(t)`` tokens and takes ``cost(B, t)`` seconds; the policy picks the
candidate with the most tokens per second for the current B.

Two sources for that rate:
- a *prior*: E(t) from the heads' accuracies (``accuracies.json``; scaled by the acceptance the
  engine observes, since independent-head estimates run optimistic) over a step-cost model (flat up
  to the hardware's knee, then per token; ``$VLLM_MEDUSA_COST_PROFILE`` from ``bench/calibrate.py``);
- *measurement*: the runner reports every pure-decode step's emitted tokens and wall period, and the
  policy keeps a moving average per (batch bucket, candidate). Measured rates replace the prior,
  and the prior (rescaled to the measured ones) only decides which untried candidates are worth a
  probe. Probes are rare and limited to plausible candidates, so a wrong cost model costs a few
  steps, not the run. This is what makes the policy hardware-independent: on a CPU where 5-token
  steps are not free, or a GPU where they are, it converges to what is fastest there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

from vllm_medusa.trees import MedusaTree, chain, expected_acceptance_length, node_values

# Accuracy guess used when the heads ship no accuracies.json: a typical Medusa-1 small model.
_FALLBACK_ACCURACIES = [[0.5, 0.12, 0.05, 0.03], [0.3, 0.1, 0.05, 0.03], [0.2, 0.08, 0.04, 0.02],
                        [0.15, 0.06, 0.03, 0.02], [0.12, 0.05, 0.03, 0.02]]
_TREE_SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_MAX_CHAIN = 4


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per forward step: tokens in the step, plus the cost of speculating at all."""

    base: float = 0.031
    knee: int = 6
    per_token: float = 0.004
    draft: float = 0.006
    per_node: float = 0.0006
    tree_pass: float = 0.005  # recomputing branching-tree rows in every layer (~5 ms at batch 1 here)

    def cost(self, tokens: int) -> float:
        return self.base + self.per_token * max(0, tokens - self.knee)

    def step(self, batch: int, nodes: int, branching: bool) -> float:
        """A step of ``batch`` requests verifying ``nodes`` nodes each."""
        t = self.cost(batch * (nodes + 1))
        if nodes:
            t += self.draft + (self.tree_pass + self.per_node * batch * nodes if branching else 0.0)
        return t

    @staticmethod
    def from_file(path: str) -> "StepCostModel":
        with open(path) as f:
            data = json.load(f)
        keys = ("base", "knee", "per_token", "draft", "per_node", "tree_pass")
        return StepCostModel(**{k: data[k] for k in keys if k in data})

    @staticmethod
    def default() -> "StepCostModel":
        """From ``$VLLM_MEDUSA_COST_PROFILE`` (a JSON written by ``bench/calibrate.py``) if set."""
        path = os.environ.get("VLLM_MEDUSA_COST_PROFILE")
        return StepCostModel.from_file(path) if path else StepCostModel()


def candidate_trees(tree: MedusaTree, num_heads: int | None = None) -> list[MedusaTree]:
    """No speculation, top-1 chains (up to 4 deep, as many as the heads allow) and prefixes of the
    tree (smallest first)."""
    out = [tree.truncate(0)]
    for d in range(1, min(_MAX_CHAIN, num_heads or tree.depth) + 1):
        out.append(MedusaTree(tuple(chain(d))))
    for n in [*_TREE_SIZES, tree.num_nodes]:
        if n <= tree.num_nodes:
            out.append(tree.truncate(n))
    unique: dict[frozenset, MedusaTree] = {}
    for t in out:
        unique.setdefault(frozenset(t.paths), t)
    return sorted(unique.values(), key=lambda t: (t.num_nodes, not t.is_chain))


def batch_bucket(batch: int) -> int:
    """Powers of two: few buckets, so little exploration when the batch drains request by request."""
    return 1 << max(batch - 1, 0).bit_length()


@dataclass
class _Arm:
    """Exponentially decayed sums of emitted tokens and seconds: rate = tokens / seconds (a ratio
    of sums, not a mean of per-step ratios, which acceptance noise would bias)."""

    tokens: float = 0.0
    seconds: float = 0.0
    count: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _decayed_count(n: int, decay: float) -> float:
    """Sum of decay**i for i < n: the weight of n samples in the decayed sums."""
    return (1 - decay ** n) / (1 - decay)


@dataclass
class _Bucket:
    arms: dict[int, _Arm] = field(default_factory=dict)  # candidate index -> measurements
    steps: int = 0


@dataclass
class TreeBudgetPolicy:
    tree: MedusaTree
    accuracies: Sequence[Sequence[float]]
    cost: StepCostModel = field(default_factory=StepCostModel.default)
    adaptive: bool = True
    refresh_every: int = 256  # tree steps between re-estimates of the acceptance scale
    min_samples: int = 16  # measured steps before a candidate's measurement replaces its prior
    probe_every: int = 16  # once measured, one re-probe of a neighbour in this many steps
    close: float = 0.9  # ... a neighbour measured further behind than this only every 4th time
    plausible: float = 0.85  # probe candidates whose rescaled prior is within this of the best
    neighbour_floor: float = 0.7  # ... and the larger neighbour of the best unless far worse
    decay: float = 1 - 1 / 64  # measurements fade over ~64 steps (costs drift with context)
    margin: float = 0.03  # speculation must beat no speculation by this much
    outlier: float = 4.0  # a step this many times slower than usual is not the candidate's cost
    num_heads: int | None = None  # chains may go this deep (default: the tree's depth)
    candidates: list[MedusaTree] = field(init=False)
    _buckets: dict[int, _Bucket] = field(default_factory=dict, repr=False)
    _prior: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)
    _lengths: dict[tuple, float] = field(default_factory=dict, repr=False)
    _values: dict[tuple, list[float]] = field(default_factory=dict, repr=False)
    _seen: float = 0.0
    _predicted: float = 0.0
    _since_refresh: int = 0
    _scale: float = 1.0

    def __post_init__(self) -> None:
        self.candidates = candidate_trees(self.tree, self.num_heads)

    @staticmethod
    def for_tree(tree: MedusaTree, accuracies: Sequence[Sequence[float]] | None,
                 adaptive: bool = True, cost: StepCostModel | None = None,
                 num_heads: int | None = None) -> "TreeBudgetPolicy":
        return TreeBudgetPolicy(tree, accuracies or _FALLBACK_ACCURACIES,
                                cost or StepCostModel.default(), adaptive, num_heads=num_heads)

    # -- the prior -----------------------------------------------------------------------------
    def _predicted_length(self, tree: MedusaTree) -> float:
        """``expected_acceptance_length`` under the heads' accuracies, memoised per tree."""
        if tree.paths not in self._lengths:
            self._lengths[tree.paths] = expected_acceptance_length(tree, self.accuracies)
        return self._lengths[tree.paths]

    def node_values(self, tree: MedusaTree) -> list[float]:
        """Per node of ``tree``, its chance of acceptance under the heads' accuracies, scaled like
        ``expected_length`` (what a prompt-lookup node must beat to take its place)."""
        if tree.paths not in self._values:
            self._values[tree.paths] = [min(v * self._scale, 1.0) for v in node_values(tree, self.accuracies)]
        return self._values[tree.paths]

    def node_costs(self, batch: int, tree: MedusaTree, extra: int) -> list[float]:
        """The price of 1..``extra`` more verified nodes in one request's ``tree``, each in accepted
        tokens it must bring to pay for itself: the step's tokens times the relative cost of that
        token in the step (the cost model's marginal token where it lands, plus a node's price)."""
        tokens = batch * (tree.num_nodes + 1)
        step = self.cost.step(batch, tree.num_nodes, not tree.is_chain)
        emitted = batch * self.expected_length(tree)
        return [emitted * (self.cost.cost(tokens + i + 1) - self.cost.cost(tokens + i) + self.cost.per_node)
                / step for i in range(extra)]

    def expected_length(self, tree: MedusaTree) -> float:
        """Predicted acceptance length, with its speculative part scaled by observation."""
        if tree.num_nodes == 0:
            return 1.0
        return 1.0 + (self._predicted_length(tree) - 1.0) * self._scale

    def throughput(self, batch: int, tree: MedusaTree) -> float:
        """Prior tokens per second with ``tree`` for each of ``batch`` requests."""
        return (batch * self.expected_length(tree)
                / self.cost.step(batch, tree.num_nodes, not tree.is_chain))

    def _prior_rate(self, batch: int, index: int) -> float:
        key = (batch, index)
        if key not in self._prior:
            self._prior[key] = self.throughput(batch, self.candidates[index])
        return self._prior[key]

    # -- choosing ------------------------------------------------------------------------------
    def choose(self, batch: int) -> MedusaTree:
        """The tree for each of ``batch`` decoding requests in the next step."""
        if not self.adaptive:
            return self.tree
        return self.candidates[self._choose_index(max(batch, 1))]

    def prior_choice(self, batch: int) -> MedusaTree:
        """What the prior alone would pick (no measurement, no probing)."""
        if not self.adaptive:
            return self.tree
        rates = [self._prior_rate(max(batch, 1), i) for i in range(len(self.candidates))]
        return self.candidates[max(range(len(rates)), key=lambda i: (rates[i], -i))]

    def _correction(self, index: int, key: int) -> float | None:
        """measured / prior of a candidate in the nearest other bucket that measured it."""
        best = None
        for b, other in self._buckets.items():
            arm = other.arms.get(index)
            if b != key and arm is not None and arm.count >= self.min_samples:
                dist = abs((b).bit_length() - key.bit_length())
                if best is None or dist < best[0]:
                    best = (dist, arm.rate / max(self._prior_rate(b, index), 1e-9))
        return best[1] if best else None

    def _scores(self, batch: int, bucket: _Bucket) -> list[float]:
        """Measured rate where there are enough samples; else the prior, corrected by what other
        batch buckets measured for that candidate, or rescaled to this bucket's measurements."""
        key = batch_bucket(batch)
        priors = [self._prior_rate(batch, i) for i in range(len(self.candidates))]
        measured = [(a.rate, priors[i]) for i, a in bucket.arms.items() if a.count >= self.min_samples]
        ratios = sorted(m / p for m, p in measured if p > 0)
        scale = ratios[len(ratios) // 2] if ratios else 1.0
        scores = []
        for i, p in enumerate(priors):
            arm = bucket.arms.get(i)
            if arm is not None and arm.count >= self.min_samples:
                scores.append(arm.rate)
            else:
                c = self._correction(i, key)
                scores.append(p * (c if c is not None else scale))
        return scores

    def _choose_index(self, batch: int) -> int:
        bucket = self._buckets.setdefault(batch_bucket(batch), _Bucket())
        bucket.steps += 1
        scores = self._scores(batch, bucket)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if scores[best] < (1 + self.margin) * scores[0]:
            best = 0  # speculate only for a clear gain: measurements are noisy
        # Probe the best one's neighbours (so a prior with the wrong shape is walked away from) and
        # any candidate the rescaled prior finds plausible, until each has a measurement. The
        # smaller neighbour is always worth a look (it is cheaper); the larger one only if the prior
        # does not rule it out, so a busy batch is not slowed by probing big trees.
        neighbours = [i for i in (best - 1, best + 1) if 0 <= i < len(scores)
                      and (i < best or scores[i] >= self.neighbour_floor * scores[best])]
        plausible = [i for i in range(len(scores)) if scores[i] >= self.plausible * scores[best]]
        untried = [i for i in dict.fromkeys(neighbours + plausible) if i != best
                   and bucket.arms.get(i, _Arm()).count < self.min_samples]
        if untried and bucket.steps % 2 == 0:
            return max(untried, key=lambda i: scores[i])
        if not untried and neighbours and bucket.steps % self.probe_every == 0:
            # Keep the neighbours' measurements fresh: costs drift with context length. Each probe
            # of a clear loser is a slower step (on a busy server, the usual case), so those wait
            # four times as long.
            i = neighbours[(bucket.steps // self.probe_every) % len(neighbours)]
            if scores[i] >= self.close * scores[best] or bucket.steps % (4 * self.probe_every) == 0:
                return i
        return best

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per batch bucket, per measured candidate (``chain-N``/``tree-N``/``none``): tokens/s, samples."""
        def name(t: MedusaTree) -> str:
            return "none" if t.num_nodes == 0 else f"{'chain' if t.is_chain else 'tree'}-{t.num_nodes}"
        return {str(b): {name(self.candidates[i]): {"tok_s": round(a.rate, 1), "steps": a.count}
                         for i, a in sorted(bucket.arms.items())}
                for b, bucket in sorted(self._buckets.items())}

    # -- feedback ------------------------------------------------------------------------------
    def record_step(self, batch: int, tree: MedusaTree, tokens: int, seconds: float) -> None:
        """A pure-decode step of ``batch`` requests that were given ``tree`` emitted ``tokens`` in
        ``seconds`` (its wall period, scheduling included)."""
        if not self.adaptive or seconds <= 0:
            return
        try:
            index = next(i for i, c in enumerate(self.candidates) if c is tree)
        except StopIteration:
            return
        bucket = self._buckets.setdefault(batch_bucket(batch), _Bucket())
        usual = max(bucket.arms.values(), key=lambda a: a.count, default=None)
        if usual is not None and usual.count >= self.min_samples:
            if seconds > self.outlier * usual.seconds / _decayed_count(usual.count, self.decay):
                return  # a one-off stall (first use of a code path, another process), not a cost
        arm = bucket.arms.setdefault(index, _Arm())
        arm.tokens = arm.tokens * self.decay + tokens
        arm.seconds = arm.seconds * self.decay + seconds
        arm.count += 1

    def observe(self, tree: MedusaTree, accepted: int) -> None:
        """One verified ``tree`` accepted ``accepted`` of its nodes."""
        if tree.num_nodes == 0:
            return
        self._seen += accepted
        self._predicted += self._predicted_length(tree) - 1.0
        self._since_refresh += 1
        if self._since_refresh >= self.refresh_every:
            if self._predicted > 0:
                self._scale = min(max(self._seen / self._predicted, 0.05), 2.0)
            self._since_refresh = 0
            self._prior.clear()
            self._values.clear()
