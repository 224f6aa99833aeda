"""Which tree each request gets per step, so that speculation never slows a busy batch.

Candidates are "no speculation", chains along the heads' top-1 guesses (no tree pass of attention
needed) and the first n nodes of the tree for a few n. A step of B decoding requests, each verifying
a candidate tree t, emits ``B * E(t)`` tokens and takes ``cost(B, t)`` seconds; the policy picks the
candidate with the most tokens per second for the current B.

Two sources for that rate:
- a *prior*: E(t) from the heads' accuracies (``accuracies.json``; scaled by the acceptance the
  engine observes, since independent-head estimates run optimistic) over a step-cost model (flat up
  to the hardware's knee, then per token, plus the tree pass of branching trees; all measured at
  engine start, or ``$VLLM_MEDUSA_COST_PROFILE`` from ``bench/calibrate.py``);
- *measurement*: the runner reports every pure-decode step's emitted tokens and wall period, and the
  policy keeps a moving average per (batch bucket, candidate). Measured rates replace the prior,
  and the prior (rescaled to the measured ones) only decides which untried candidates are worth a
  probe. This is what makes the policy hardware-independent: on a CPU where 5-token steps are not
  free, or a GPU where they are, it converges to what is fastest there.

Exploring has a bounded price: a step spent on anything but the current best is charged what it
lost against the best's rate, and a probe is taken only while the charges stay within
``explore_budget`` (1%) of the decoding time so far; a candidate whose prior, even ``prior_slack``
times better, cannot beat the best is never probed. The cost model (measured at engine start) and
the measurements are saved per setup (``profile_store.py``), so a fresh engine starts converged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from vllm_medusa.trees import MedusaTree, chain, expected_acceptance_length, node_values

# Accuracy guess used when the heads ship no accuracies.json: a typical Medusa-1 small model.
_FALLBACK_ACCURACIES = [[0.5, 0.12, 0.05, 0.03], [0.3, 0.1, 0.05, 0.03], [0.2, 0.08, 0.04, 0.02],
                        [0.15, 0.06, 0.03, 0.02], [0.12, 0.05, 0.03, 0.02]]
_TREE_SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_MAX_CHAIN = 4


_COST_KEYS = ("base", "knee", "per_token", "draft", "per_node", "tree_pass", "tree_per_request")


@dataclass(frozen=True)
class StepCostModel:
    """Seconds per forward step: tokens in the step, plus the cost of speculating at all."""

    base: float = 0.031
    knee: int = 6
    per_token: float = 0.004
    draft: float = 0.006
    # The tree pass (branching trees only): every layer rereads each tree request's context and
    # recomputes its rows. Measured at start-up (``fit_tree_pass``); these are an AMX CPU's figures.
    per_node: float = 0.00012  # per verified node of each request
    tree_pass: float = 0.0  # once per step
    tree_per_request: float = 0.006  # per branching request (its context, in every layer)
    points: tuple[tuple[int, float], ...] = ()  # measured (tokens, seconds): interpolated if given

    def cost(self, tokens: int) -> float:
        if len(self.points) >= 2:
            pts = self.points
            if tokens <= pts[0][0]:
                return pts[0][1]
            for (t0, s0), (t1, s1) in zip(pts, pts[1:]):
                if tokens <= t1 or (t1, s1) == pts[-1]:
                    return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
        return self.base + self.per_token * max(0, tokens - self.knee)

    def step(self, batch: int, nodes: int, branching: bool) -> float:
        """A step of ``batch`` requests verifying ``nodes`` nodes each."""
        t = self.cost(batch * (nodes + 1))
        if nodes:
            t += self.draft + (self.tree_pass_cost(batch, nodes) if branching else 0.0)
        return t

    def tree_pass_cost(self, batch: int, nodes: int) -> float:
        """The tree pass of a step where ``batch`` requests verify branching trees of ``nodes``."""
        return self.tree_pass + self.tree_per_request * batch + self.per_node * batch * nodes

    @staticmethod
    def from_dict(data: dict) -> "StepCostModel":
        values = {k: data[k] for k in _COST_KEYS if k in data}
        if "tree_pass" in values and "tree_per_request" not in values:
            values["tree_per_request"] = 0.0  # written before the term existed: tree_pass was all of it
        if not all(isinstance(v, (int, float)) and v >= 0 for v in values.values()):
            raise ValueError(f"step-cost model needs non-negative numbers, got {values}")
        try:
            points = tuple(sorted((int(t), float(sec)) for t, sec in data.get("points", ())))
        except (TypeError, ValueError) as e:
            raise ValueError(f"step-cost points must be [tokens, seconds] pairs: {e}") from None
        if any(t < 1 or sec <= 0 for t, sec in points) or len({t for t, _ in points}) != len(points):
            raise ValueError(f"step-cost points must have distinct token counts >= 1 and positive times: {points}")
        return StepCostModel(**values, points=points)

    def to_dict(self) -> dict:
        d: dict = {k: getattr(self, k) for k in _COST_KEYS}
        if self.points:
            d["points"] = [list(p) for p in self.points]
        return d

    @staticmethod
    def from_file(path: str) -> "StepCostModel":
        with open(path) as f:
            return StepCostModel.from_dict(json.load(f))

    @staticmethod
    def fit(points: dict[int, float], **fixed: float) -> "StepCostModel":
        """The measured points (interpolated by ``cost``), and a flat-then-linear summary of forward
        seconds per step carrying T tokens for reading: for each candidate
        knee, least squares of ``base + per_token * max(0, T - knee)`` in relative error (small
        steps matter as much as big ones); the best knee wins. ``fixed`` sets the terms a forward
        pass does not measure (drafting, the tree pass)."""
        ts = sorted(points)
        if len(ts) < 3 or any(points[t] <= 0 for t in ts):
            raise ValueError(f"need positive step times for at least 3 token counts, got {points}")
        best: tuple[float, float, float, int] | None = None
        for knee in range(1, ts[-2] + 1):
            xs = [max(0, t - knee) for t in ts]
            w = [1 / points[t] ** 2 for t in ts]
            sw = sum(w)
            mx = sum(wi * x for wi, x in zip(w, xs)) / sw
            my = sum(wi * points[t] for wi, t in zip(w, ts)) / sw
            sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
            slope = max(sum(wi * (x - mx) * (points[t] - my) for wi, x, t in zip(w, xs, ts)) / sxx, 0.0) if sxx else 0.0
            base = my - slope * mx
            err = sum(wi * (base + slope * x - points[t]) ** 2 for wi, x, t in zip(w, xs, ts))
            if base > 0 and (best is None or err < best[0]):
                best = (err, base, slope, knee)
        if best is None:
            raise ValueError(f"no flat-then-linear fit for {points}")
        _, base, per_token, knee = best
        return StepCostModel(base=base, knee=knee, per_token=max(per_token, 1e-6),
                             points=tuple((t, points[t]) for t in ts), **fixed)

    def fit_tree_pass(self, points: dict[tuple[int, int], float]) -> "StepCostModel":
        """This model with its tree-pass terms fitted to measured ``(requests, nodes) -> seconds``
        of the tree pass alone: non-negative least squares of ``tree_pass + tree_per_request * R +
        per_node * R * nodes`` in relative error."""
        if len(points) < 3 or any(sec <= 0 for sec in points.values()):
            raise ValueError(f"need positive tree-pass times for at least 3 shapes, got {points}")
        keys = sorted(points)
        rows = torch.tensor([[1.0, r, r * n] for r, n in keys], dtype=torch.float64)
        y = torch.tensor([points[k] for k in keys], dtype=torch.float64)
        w = 1.0 / y
        free = [0, 1, 2]
        coef = torch.zeros(3, dtype=torch.float64)
        while free:
            a = rows[:, free] * w[:, None]
            sol = torch.linalg.lstsq(a, (y * w)[:, None]).solution[:, 0]
            coef.zero_()
            coef[free] = sol
            if (sol >= 0).all():
                break
            free = [f for f, v in zip(free, sol.tolist()) if v > 0]  # drop the terms fitted negative
        tree_pass, per_request, per_node = coef.clamp(min=0).tolist()
        return replace(self, tree_pass=tree_pass, tree_per_request=per_request, per_node=per_node)

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
    best: int = 0  # the candidate the last choice thought best, and its score (tokens/s)
    best_score: float = 0.0


def candidate_name(tree: MedusaTree) -> str:
    return "none" if tree.num_nodes == 0 else f"{'chain' if tree.is_chain else 'tree'}-{tree.num_nodes}"


@dataclass
class TreeBudgetPolicy:
    tree: MedusaTree
    accuracies: Sequence[Sequence[float]]
    cost: StepCostModel = field(default_factory=StepCostModel.default)
    adaptive: bool = True
    refresh_every: int = 256  # tree steps between re-estimates of the acceptance scale
    min_samples: int = 16  # measured steps before a candidate's measurement replaces its prior
    early_samples: int = 4  # ... and before it prices further probes of it
    probe_every: int = 16  # once measured, one re-probe of a neighbour in this many steps
    prior_slack: float = 1.2  # never probe an untried candidate whose prior x this loses to the best
    explore_budget: float = 0.01  # probes may cost at most this fraction of the decoding time so far
    decay: float = 1 - 1 / 64  # measurements fade over ~64 steps (costs drift with context)
    margin: float = 0.03  # speculation must beat no speculation by this much
    prior_margin: float = 0.10  # ... by this much where the speculating candidate is not yet measured
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
    _elapsed: float = 0.0  # seconds of recorded steps
    _explore_spent: float = 0.0  # seconds those steps lost to probing (vs the best's rate)

    def __post_init__(self) -> None:
        self.candidates = candidate_trees(self.tree, self.num_heads)

    @staticmethod
    def for_tree(tree: MedusaTree, accuracies: Sequence[Sequence[float]] | None,
                 adaptive: bool = True, cost: StepCostModel | None = None,
                 num_heads: int | None = None) -> "TreeBudgetPolicy":
        return TreeBudgetPolicy(tree, accuracies or _FALLBACK_ACCURACIES,
                                cost or StepCostModel.default(), adaptive, num_heads=num_heads)

    def set_cost(self, cost: StepCostModel) -> None:
        """Price the prior with another step-cost model (measured at start-up, or loaded)."""
        self.cost = cost
        self._prior.clear()

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
        measured = {i for i, a in bucket.arms.items() if a.count >= self.min_samples}
        margin = self.margin if best in measured else self.prior_margin
        if scores[best] < (1 + margin) * scores[0]:
            best = 0  # speculate only for a clear gain: measurements are noisy, priors more so
        bucket.best, bucket.best_score = best, scores[best]
        # Probe the best one's smaller neighbour (cheaper steps: so a prior with the wrong shape is
        # walked away from) and any candidate the prior, given the benefit of the doubt, could find
        # better than the best, until each has a measurement. A larger candidate the prior rules
        # out is never tried: on a busy batch, that is every speculating one.
        eligible = [i for i in range(len(scores)) if i != best and (
            i in measured or i == best - 1 or scores[i] * self.prior_slack >= scores[best])]
        untried = [i for i in eligible if i not in measured]
        if untried and bucket.steps % 2 == 0:
            # The cheaper neighbour first: where a prior errs, it is mostly on what speculating costs.
            i = best - 1 if best - 1 in untried else max(untried, key=lambda i: scores[i])
            if self._affordable(bucket, scores, i):
                return i
        neighbours = [i for i in (best - 1, best + 1) if i in eligible]
        if not untried and neighbours and bucket.steps % self.probe_every == 0:
            # Keep the neighbours' measurements fresh: costs drift with context length.
            i = neighbours[(bucket.steps // self.probe_every) % len(neighbours)]
            if self._affordable(bucket, scores, i):
                return i
        return best

    def _affordable(self, bucket: _Bucket, scores: list[float], index: int) -> bool:
        """Whether a step of ``index`` instead of the best keeps exploring within its budget. Its
        expected loss is the usual step's seconds times how far its rate trails the best's: the
        rate its first few probe steps measured, else its score."""
        step = self._usual_seconds(bucket)
        if step is None:
            step = self._elapsed / max(sum(a.count for b in self._buckets.values() for a in b.arms.values()), 1)
        arm = bucket.arms.get(index)
        rate = arm.rate if arm is not None and arm.count >= self.early_samples else scores[index]
        loss = step * max(0.0, 1.0 - rate / max(scores[bucket.best], 1e-9))
        return self._explore_spent + loss <= self.explore_budget * self._elapsed

    def _usual_seconds(self, bucket: _Bucket, min_count: int = 1) -> float | None:
        """Mean seconds of a step of the bucket's most measured candidate (None below ``min_count``)."""
        usual = max(bucket.arms.values(), key=lambda a: a.count, default=None)
        if usual is None or usual.count < max(min_count, 1):
            return None
        return usual.seconds / _decayed_count(usual.count, self.decay)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per batch bucket, per measured candidate (``chain-N``/``tree-N``/``none``): tokens/s, samples."""
        return {str(b): {candidate_name(self.candidates[i]): {"tok_s": round(a.rate, 1), "steps": a.count}
                         for i, a in sorted(bucket.arms.items())}
                for b, bucket in sorted(self._buckets.items())}

    def exploration(self) -> dict[str, float]:
        """Seconds decoding and seconds lost to probes (steps of a candidate that was not the best,
        charged against the best's rate), since this engine started."""
        return {"elapsed_s": round(self._elapsed, 3), "explore_s": round(self._explore_spent, 3),
                "fraction": round(self._explore_spent / self._elapsed, 5) if self._elapsed else 0.0}

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What was learned while serving (JSON-able): the acceptance scale and, per batch bucket
        and candidate, the decayed sums of tokens and seconds."""
        return {"scale": self._scale, "seen": self._seen, "predicted": self._predicted,
                "buckets": {str(b): {candidate_name(self.candidates[i]): [a.tokens, a.seconds, a.count]
                                     for i, a in bucket.arms.items()}
                            for b, bucket in self._buckets.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Start from an earlier engine's measurements (candidates it named that this policy lacks
        are skipped). Raises ValueError on a malformed state, leaving this policy as it was."""
        names = {candidate_name(c): i for i, c in enumerate(self.candidates)}
        try:
            scale = float(state["scale"])
            buckets: dict[int, _Bucket] = {}
            for b, arms in state["buckets"].items():
                bucket = buckets.setdefault(int(b), _Bucket())
                for name, (tokens, seconds, count) in arms.items():
                    if name in names and float(seconds) > 0 and float(tokens) >= 0:
                        bucket.arms[names[name]] = _Arm(float(tokens), float(seconds), int(count))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed policy state: {e!r}") from e
        if not 0.0 < scale <= 2.0:
            raise ValueError(f"malformed policy state: acceptance scale {scale}")
        self._buckets, self._scale = buckets, scale
        self._seen, self._predicted = float(state.get("seen", 0.0)), float(state.get("predicted", 0.0))
        self._prior.clear()
        self._values.clear()

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
        usual = self._usual_seconds(bucket, self.min_samples)
        if usual is not None and seconds > self.outlier * usual:
            return  # a one-off stall (first use of a code path, another process), not a cost
        self._elapsed += seconds
        if index != bucket.best and bucket.best_score > 0:
            self._explore_spent = max(0.0, self._explore_spent + seconds - tokens / bucket.best_score)
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
