"""The verdict policy of THEORY.md section 3, in one place.

A certificate (a fixed change of the SAE, see theory/changes.py) becomes a verdict only
when its descent is out of sample, significant, material and measured:

- significance (3.3): the held-out change per token has a standard error from the streamed
  sum and sum of squares of the per-token changes; the descent is significant when
  change + z SE < 0 with z = Phi^-1(1 - alpha / m), m the number of certificates tested in the
  layer (Bonferroni). C2 pairs also need count evidence: the child's co-activation with the
  parent must be significant against independence (same correction over the pairs).
- materiality (3.4): the held-out gain as a share of what the feature is worth (its value
  v_i, the rise of L when it is removed) or, for layer findings, of the layer's held-out L.
- tiers (3.6): certified = significant and material; violated = descent on the audit tokens
  that is not; satisfied = no descent on the audit tokens.
- ranking (3.5): by held-out gain per token within each tier.

Pure Python and torch; nothing here knows about TransformerLens or SAE-Lens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.accumulator import Clustered

TIERS = ("certified", "violated", "satisfied")
TIER_RANK = {"certified": 0, "violated": 1, "satisfied": 2}

# The default materiality thresholds, chosen from measurements (docs/THEORY.md, "Verdicts").
MIN_SHARE = 0.01  # a feature finding must recover at least 1% of the feature's own value
MIN_LAYER_SHARE = 1e-3  # a layer finding must recover at least 0.1% of the layer's held-out L
MIN_TOUCHED = 30  # held-out tokens a certificate must change before its normal-approximation SE is trusted


@dataclass(frozen=True)
class VerdictPolicy:
    """The settable parts of the policy (AuditOptions carries one)."""

    alpha: float = 0.05
    min_share: float = MIN_SHARE
    min_layer_share: float = MIN_LAYER_SHARE
    min_touched: int = MIN_TOUCHED

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha is a significance level in (0, 1), got {self.alpha!r}")
        if not (self.min_share >= 0 and self.min_layer_share >= 0):
            raise ValueError("min_share and min_layer_share are shares >= 0")
        if self.min_touched < 2:
            raise ValueError(f"min_touched must be at least 2 (a standard error needs two tokens), got {self.min_touched}")

    def critical_z(self, n_tests: int) -> float:
        """Phi^-1(1 - alpha / m): the one-sided Bonferroni threshold for m tests."""
        return normal_quantile(1 - self.alpha / max(n_tests, 1))


@dataclass
class Estimate:
    """A held-out mean change per token with its standard error (vectorised over certificates)."""

    mean: Tensor  # (F,) float64
    se: Tensor  # (F,) float64
    p_value: Tensor  # (F,) one-sided: P(a change this low | no true change)


def estimate(total: Tensor, total_sq: Tensor, n: int) -> Estimate:
    """Mean and standard error of a per-token change from its sum and sum of squares over n tokens."""
    total, total_sq = total.double(), total_sq.double()
    if n < 2:
        nan = torch.full_like(total, math.nan)
        return Estimate(total / n if n else nan, nan, torch.ones_like(total))
    mean = total / n
    variance = ((total_sq - n * mean**2) / (n - 1)).clamp(min=0)
    se = torch.sqrt(variance / n)
    return Estimate(mean, se, p_value(mean, se))


def clustered_estimate(total: Tensor, cluster_sq: Tensor, cluster_cross: Tensor, count_sq: float, n: int,
                       n_clusters: int) -> Estimate:
    """Mean per token of a change summed over n tokens in `n_clusters` windows, with the standard
    error of a ratio estimator over windows (tokens of one window are not independent): from
    sum_w T_w^2 (`cluster_sq`), sum_w n_w T_w (`cluster_cross`) and sum_w n_w^2 (`count_sq`), T_w the
    window's total and n_w its tokens, var = W / (W - 1) sum_w (T_w - n_w mean)^2 / n^2."""
    total = total.double()
    if n < 2 or n_clusters < 2:
        nan = torch.full_like(total, math.nan)
        return Estimate(total / n if n else nan, nan, torch.ones_like(total))
    mean = total / n
    spread = (cluster_sq.double() - 2 * mean * cluster_cross.double() + mean**2 * count_sq).clamp(min=0)
    se = torch.sqrt(n_clusters / (n_clusters - 1) * spread) / n
    return Estimate(mean, se, p_value(mean, se))


def window_estimate(sums: Clustered) -> Estimate:
    """`clustered_estimate` of a `Clustered` accumulator's sums."""
    return clustered_estimate(sums.total, sums.cluster_sq, sums.cluster_cross, float(sums.count_sq),
                              int(sums.n_tokens), int(sums.n_windows))


def p_value(mean: Tensor, se: Tensor) -> Tensor:
    """One-sided p-value of a descent (normal approximation). A change that is the same on every
    token (SE 0) is exact: p = 0 for a descent, 1 otherwise."""
    safe = torch.where(se > 0, se, 1.0)
    p = 0.5 * torch.erfc(-(mean / safe) / math.sqrt(2))
    return torch.where(se > 0, p, torch.where(mean < 0, 0.0, 1.0))


def normal_quantile(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def count_p_value(hits: int, trials: int, rate: float) -> float:
    """P(X >= hits) for X ~ Binomial(trials, rate), bounded above by Chernoff's inequality
    exp(-trials KL(hits/trials || rate)) (exact when hits = trials: rate^trials). Conservative,
    so a pair called significant on it is significant on the exact tail too."""
    if trials <= 0 or hits <= rate * trials:
        return 1.0
    if rate <= 0:
        return 0.0
    share = hits / trials
    kl = share * math.log(share / rate)
    if share < 1:
        kl += (1 - share) * math.log((1 - share) / (1 - rate))
    return math.exp(-trials * kl)


def upper_rate(failures: int, trials: int) -> float:
    """95% upper bound on a rate: the rule of three when nothing failed, else Wilson's bound."""
    if trials <= 0:
        return 1.0
    if failures == 0:
        return min(1.0, 3.0 / trials)
    z, p = 1.6448536269514722, failures / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / (1 + z * z / trials))


@dataclass
class Verdict:
    tier: str
    reason: str


def decide(
    policy: VerdictPolicy,
    *,
    audit_change: float,
    held_out: float | None,
    se: float | None,
    touched: int,
    z: float,
    share: float | None,
    layer_finding: bool = False,
    count_p: float | None = None,
    count_threshold: float | None = None,
) -> Verdict:
    """The tier of one certificate (THEORY.md 3.6), with the reason when it is not certified:
    `decide_all` of one. `share` None means the scale is not positive (a feature worth nothing:
    any significant gain is material)."""
    return decide_all(policy, audit_change=[audit_change], held_out=[held_out], se=[se], touched=[touched], z=z,
                      share=[share], layer_finding=layer_finding,
                      count_p=None if count_p is None else [count_p], count_threshold=count_threshold)[0]


def decide_all(
    policy: VerdictPolicy,
    *,
    audit_change: list[float],
    held_out: list[float | None],
    se: list[float | None],
    touched: list[int],
    z: float,
    share: list[float | None],
    layer_finding: bool = False,
    count_p: list[float] | None = None,
    count_threshold: float | None = None,
) -> list[Verdict]:
    """The tiers of a family's certificates at once (THEORY.md 3.6), in float64: the first rule an
    entry fails gives its tier and reason. None (and NaN) mean: no held-out measurement, no count
    test, or no positive scale (`share`)."""
    f64 = dict(dtype=torch.float64)
    nan = math.nan
    change = torch.tensor(audit_change, **f64)
    mean = torch.tensor([nan if v is None else v for v in held_out], **f64)
    error = torch.tensor([nan if v is None else v for v in se], **f64)
    hit = torch.tensor(touched, dtype=torch.int64)
    worth = torch.tensor([nan if v is None else v for v in share], **f64)
    threshold = policy.min_layer_share if layer_finding else policy.min_share
    counted = count_p is not None and count_threshold is not None
    chance = torch.tensor(count_p, **f64) >= count_threshold if counted else torch.zeros(len(change), dtype=torch.bool)
    failed = torch.stack([
        ~(change < 0),  # no descent on the audit tokens (NaN included)
        torch.isnan(mean) | torch.isnan(error),
        hit < policy.min_touched,
        ~((mean < 0) & (mean + z * error < 0)),  # change + z SE < 0 and a strict descent
        chance,
        worth < threshold,  # NaN (no positive scale): material
        torch.ones(len(change), dtype=torch.bool),  # certified
    ])
    rule = failed.int().argmax(0).tolist()  # the first failed rule
    out = []
    for k, r in enumerate(rule):
        if r == 0:
            out.append(Verdict("satisfied", "no descent on the audit tokens"))
        elif r == 1:
            out.append(Verdict("violated", "no held-out tokens to confirm it"))
        elif r == 2:
            out.append(Verdict("violated",
                               f"changes only {touched[k]} held-out token(s) (fewer than {policy.min_touched})"))
        elif r == 3:
            out.append(Verdict("violated", "held-out descent not significant"))
        elif r == 4:
            out.append(Verdict("violated", "co-activation not significant against independence"))
        elif r == 5:
            out.append(Verdict("violated", f"immaterial (share {share[k]:.3g} < {threshold:g})"))
        else:
            out.append(Verdict("certified", ""))
    return out


def rank_key(tier: str, gain: float | None, ident: tuple = ()) -> tuple:
    """Within each tier, the largest held-out gain first (THEORY.md 3.5)."""
    g = -math.inf if gain is None or math.isnan(gain) else gain
    return (TIER_RANK[tier], -g, *ident)
