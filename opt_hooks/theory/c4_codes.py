"""C4, code optimality (THEORY.md section 2): active atoms must see exactly lam/2 of (weighted)
residual, inactive ones at most lam/2. Here: the lam estimate it implies, G4 and its size, the
feature's value v_i (the rise of L when the feature is removed, THEORY.md 3.4) and the
certificate, a per-feature scale of the codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opt_hooks.theory.changes import FeatureFamily, Perturbed, TokenChanges, per_entry, slots_of
from opt_hooks.theory.codes import CSR
from opt_hooks.theory.objective import check_lam
from opt_hooks.theory.stats import LayerStatistics, TokenBatch


@dataclass
class CodeCheck:
    gain: Tensor  # (K,) G4_i
    size: Tensor  # (K,) G4_i / (lam * active share): mean |2<d_i, r_n>/lam - 1| per active token


def c4_codes(gain_active: Tensor, gain_inactive: Tensor, active_count: Tensor, n_tokens: int, lam: float) -> CodeCheck:
    """C4: active atoms must see exactly lam/2 of residual, inactive ones at most lam/2.

    G4_i = (1/N)[sum_{z_in>0} |2<d_i,r_n> - lam| + sum_{z_in=0} max(0, 2<d_i,r_n> - lam)].
    """
    check_lam(lam)
    n = max(n_tokens, 1)
    gain = (gain_active + gain_inactive) / n
    share = active_count.clamp(min=1).double() / n
    return CodeCheck(gain=gain, size=gain / (lam * share))


def estimate_lam(active_projections: Tensor) -> float:
    """lam_hat = 2 * median of <d_i, r_n> over active (n, i) (THEORY.md C4)."""
    if active_projections.numel() == 0:
        raise ValueError("cannot estimate lam: no feature was active on any audit token; pass lam=")
    estimate = 2 * float(active_projections.double().median())
    if not estimate > 0:
        # Active atoms of an L1 optimum see +lam/2 of residual; a median at or below 0 means the
        # codes are not shrunk L1 codes at all, and no lam describes them.
        raise ValueError(
            f"cannot estimate lam: 2 * median <d_i, r_n> over active codes is {estimate:.3g}, not "
            "positive (the SAE does not look L1-trained on these tokens); pass lam="
        )
    return estimate


@dataclass
class CodeCertificates(FeatureFamily):
    """C4: scale feature i's codes, z_in <- (1 + t_i) z_in on every token (a change of the
    encoder's row i and bias i that any ReLU encoder can make), t_i in [-1, 1].

    The change is exactly t (lam S_z - 2 S_zq) + t^2 S_zz with S_z = sum_n z_in,
    S_zq = sum_n z_in w_n <d_i, r_n> and S_zz = sum_n w_n z_in^2: sums pass 1 has
    (S_zq = <sum z w r, d_i>).
    Its minimiser t = (2 S_zq - lam S_z) / (2 S_zz) is the exact line search. At t = -1 the
    feature is removed: its change is then v_i, the feature's value (THEORY.md 3.4)."""

    atom: Tensor  # (F, d)
    condition = "C4"

    def _compute_sums(self, stats: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features.to(stats.sum_z.device)
        z_q = (stats.sum_z_r[features].to(self.atom.device) * self.atom.double()).sum(-1)
        return stats.sum_z[features].to(z_q.device), z_q, stats.sum_z2[features].to(z_q.device)

    def line_search(self, stats: LayerStatistics, lam: float) -> Tensor:
        z, z_q, z2 = self._sums(stats)
        return ((2 * z_q - lam * z) / (2 * z2).clamp(min=1e-300)).clamp(-1, 1)

    def audit_change(self, stats: LayerStatistics, lam: float, step: Tensor) -> tuple[Tensor, Tensor]:
        z, z_q, z2 = self._sums(stats)
        first = step * (lam * z - 2 * z_q)
        return first + step**2 * z2, first

    def held_out(self, tokens: TokenBatch, lam: float) -> TokenChanges:
        entries = tokens.entries
        slots = slots_of(self.features, entries.cols, tokens.atoms.shape[0])
        t = per_entry(self.step, slots)
        z, q = entries.values.double(), tokens.projections.double()
        change = t * (lam * z - 2 * z * q) + t**2 * tokens.w(entries.rows) * z**2
        return TokenChanges.per_feature(entries, slots, len(self), change)

    def apply(self, k: int, atoms: Tensor, z: Tensor, bias: Tensor, r: Tensor, lam: float,
              weight: Tensor | None = None) -> Perturbed:
        z2 = z.clone()
        z2[:, int(self.features[k])] *= 1 + float(self.step[k])
        return atoms, z2, bias


def active_gain(codes: CSR, lam: float) -> Tensor:
    """(K,) G4's active terms, sum over active (n, i) of |2 w_n <d_i, r_n> - lam| (the kept codes'
    projections)."""
    gain = torch.zeros(codes.n_features, dtype=torch.float64, device=codes.aux.device)
    return gain.index_add_(0, codes.col.long(), (2 * codes.aux.double() - lam).abs())


def feature_values(tokens: TokenBatch, lam: float) -> Tensor:
    """(K,) sum over the tokens of the rise of each token's loss when feature i is removed (its
    codes set to 0): 2 z w <d_i, r> + w z^2 - lam z. Divided by N, the value v_i of THEORY.md 3.4,
    what a finding's gain is judged against."""
    entries = tokens.entries
    values, q = entries.values.double(), tokens.projections.double()
    return entries.per_feature(2 * values * q + tokens.w(entries.rows) * values**2 - lam * values)
