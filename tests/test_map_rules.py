"""The map's rules (THEORY.md section 6, docs/THEORY.md "The absorption map") on their boundaries.

A world in the standard basis, so that every rho is exact in float64 (0.5 * 1 + 0 * ... = 0.5),
and with exact counts on the audit tokens, so that every threshold can be met with equality:
each planted pair sits on one side of one rule, or on its boundary, and the documented answer is
known by construction. The map is also checked against the rules recomputed by brute force from
the codes and a dense Gram matrix (the world is small: K = 21)."""
from __future__ import annotations

import math

import pytest
import torch

from opt_hooks.engine import AuditOptions, LayerAudit
from opt_hooks.theory import absorption as ab

LAM = 0.2
N, D, K = 3000, 24, 21
MIN_RHO = 0.5  # the map's min_rho here; the world's spread is 0, so rho_min = MIN_RHO exactly
ABSORBED = (0, 1)  # rho = MIN_RHO exactly: at the lower bound, an absorption row
AT_DUPLICATE_RHO = (2, 3)  # an absorbed-looking pair at rho = 0.9 exactly: a duplicate, never a row
BELOW_RHO_MIN = (4, 5)  # an absorbed-looking pair at rho = 0.3 < rho_min: nothing
AT_ANTIPODAL_RHO = (6, 7)  # rho = -0.9 exactly, both dense, never together: antipodal
DENSE_AND_RARE = (8, 9)  # rho = -1, 9 on 3% of the audit tokens: not antipodal
AT_DENSE_SHARE = (10, 11)  # rho = -1, 10 on exactly 5% of the audit tokens: antipodal
OVERLAP_BETWEEN = (12, 13)  # rho = -1, 400 and 1000 tokens, 40 together: 20 < 40 <= 50, not antipodal
OVERLAP_AT_BOUND = (14, 15)  # rho = -1, 400 and 1000 tokens, 20 together = 5% of the rarer: antipodal
LIVE, DEAD_COPY, DEAD_LEANING = 16, 17, 18  # 17 = d_16 and 18 (rho 0.6 with 16) never fire
STRICT = (19, 20)  # 20 fires only with 19 (rho 0.6): (19, 20) is never measured, (20, 19) is


def boundary_world(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    e = torch.eye(D, dtype=torch.float64)
    lean = lambda a, b, rho: rho * e[a] + math.sqrt(1 - rho**2) * e[b]  # noqa: E731 -- <e_a, .> = rho exactly
    atoms = torch.zeros(K, D, dtype=torch.float64)
    for (p, c), rho in ((ABSORBED, 0.5), (AT_DUPLICATE_RHO, 0.9), (BELOW_RHO_MIN, 0.3), (AT_ANTIPODAL_RHO, -0.9),
                        (STRICT, 0.6)):
        atoms[p], atoms[c] = e[p], lean(p, c, rho)
    for a, b in (DENSE_AND_RARE, AT_DENSE_SHARE, OVERLAP_BETWEEN, OVERLAP_AT_BOUND):
        atoms[a], atoms[b] = e[a], -e[a]
    atoms[LIVE], atoms[DEAD_COPY], atoms[DEAD_LEANING] = e[LIVE], e[LIVE], lean(LIVE, DEAD_LEANING, 0.6)
    held = torch.arange(N) % 3 == 2
    size = lambda: 1 + 0.15 * torch.randn(N, generator=gen, dtype=torch.float64)  # noqa: E731
    z = torch.zeros(N, K, dtype=torch.float64)
    # absorption patterns (as tests/test_absorption.py's world): the child codes the parent at its
    # own size (z_c rho = size), the parent off on 80% of the child's tokens
    for (p, c), rho in ((ABSORBED, 0.5), (AT_DUPLICATE_RHO, 0.9), (BELOW_RHO_MIN, 0.3)):
        parent_on = torch.rand(N, generator=gen) < 0.3
        child_on = parent_on & (torch.rand(N, generator=gen) < 0.5)
        z[parent_on & ~child_on, p] = size()[parent_on & ~child_on]
        z[child_on, c] = size()[child_on] / rho
        also = child_on & (torch.rand(N, generator=gen) < 0.2)
        z[also, p] = 0.3 * size()[also]
    t = torch.randn(N, generator=gen, dtype=torch.float64)
    z[:, AT_ANTIPODAL_RHO[0]], z[:, AT_ANTIPODAL_RHO[1]] = t.clamp(min=0), (-t).clamp(min=0)
    audit_ids, held_ids = torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()

    def tokens(*counts):
        """Disjoint token sets with exactly these counts on the audit tokens (and half as many held out)."""
        audit_order = audit_ids[torch.randperm(len(audit_ids), generator=gen)]
        held_order = held_ids[torch.randperm(len(held_ids), generator=gen)]
        masks, a, h = [], 0, 0
        for k in counts:
            mask = torch.zeros(N, dtype=torch.bool)
            mask[audit_order[a:a + k]], mask[held_order[h:h + k // 2]] = True, True
            masks.append(mask)
            a, h = a + k, h + k // 2
        return masks

    for (a, b), (only_a, only_b, both) in ((DENSE_AND_RARE, (1000, 60, 0)), (AT_DENSE_SHARE, (100, 1000, 0)),
                                           (OVERLAP_BETWEEN, (960, 360, 40)), (OVERLAP_AT_BOUND, (980, 380, 20))):
        on_a, on_b, on_both = tokens(only_a, only_b, both)
        z[on_a | on_both, a] = size()[on_a | on_both]
        z[on_b | on_both, b] = size()[on_b | on_both]
    live = torch.rand(N, generator=gen) < 0.1
    z[live, LIVE] = size()[live]
    parent = torch.rand(N, generator=gen) < 0.2
    child = parent & (torch.rand(N, generator=gen) < 0.5)
    z[parent, STRICT[0]], z[child, STRICT[1]] = size()[parent], size()[child]
    bias = 0.1 * torch.randn(D, generator=gen, dtype=torch.float64)
    x = bias + z @ atoms + 0.01 * torch.randn(N, D, generator=gen, dtype=torch.float64)
    return atoms, bias, x, z, held


def run(world, map_options: dict | None = None, **options):
    atoms, bias, x, z, held = world
    pair_map = ab.MapOptions(min_rho=MIN_RHO, **(map_options or {}))
    stage = LayerAudit(atoms, bias, lam=LAM, options=AuditOptions(pair_map=pair_map, **options))
    stage.update(x[~held], z[~held], torch.arange(N)[~held])
    plan = stage.plan()
    plan.update(x, z, torch.arange(N), held_out=held)
    return plan.result()


@pytest.fixture(scope="module")
def world():
    return boundary_world()


@pytest.fixture(scope="module")
def layer(world):
    return run(world)


def brute_force_map(atoms, audit_z, options: ab.MapOptions, rho_min: float):
    """The documented rules from a dense Gram matrix and dense co-activation counts: the measured
    ordered pairs, the duplicate and the antipodal unordered pairs."""
    rho = atoms @ atoms.T
    on = (audit_z > 0).double()
    count, co = on.sum(0), on.T @ on  # exact integers in float64
    alive = count > 0
    n = len(audit_z)
    ids = [k for k in range(len(atoms)) if alive[k]]
    above = [sum(1 for i in ids if i != j and rho[i, j] >= min(rho_min, options.duplicate_rho)) for j in ids]
    below = [sum(1 for i in ids if i != j and rho[i, j] <= -options.antipodal_rho) for j in ids]
    assert max(above + below) <= options.neighbours  # every neighbour is read: no ranking to redo
    measured = {(i, j) for i in ids for j in ids
                if i != j and rho_min <= rho[i, j] < options.duplicate_rho and co[i, j] < count[j]}
    duplicates = {(i, j) for i in ids for j in ids if i < j and rho[i, j] >= options.duplicate_rho}
    dense = options.antipodal_min_share * n
    antipodal = {(i, j) for i in ids for j in ids
                 if i < j and rho[i, j] <= -options.antipodal_rho and count[i] >= dense and count[j] >= dense
                 and co[i, j] <= options.antipodal_max_overlap * min(count[i], count[j])}
    return measured, duplicates, antipodal


def test_the_world_sits_on_the_boundaries_it_claims(world):
    # the planted numbers themselves, so that the tests below test what they say
    atoms, _, _, z, held = world
    rho = atoms @ atoms.T
    assert rho[ABSORBED] == MIN_RHO and rho[AT_DUPLICATE_RHO] == 0.9 and rho[AT_ANTIPODAL_RHO] == -0.9
    on = z[~held] > 0
    count = on.sum(0)
    assert len(on) == 2000 and count[AT_DENSE_SHARE[0]] == 100 and count[DENSE_AND_RARE[1]] == 60
    for pair, together in ((OVERLAP_BETWEEN, 40), (OVERLAP_AT_BOUND, 20)):
        assert sorted(count[list(pair)].tolist()) == [400, 1000]
        assert int((on[:, pair[0]] & on[:, pair[1]]).sum()) == together
    assert count[DEAD_COPY] == count[DEAD_LEANING] == 0
    assert (on[:, STRICT[0]] | ~on[:, STRICT[1]]).all()  # the strict child never fires alone


def test_map_on_its_boundaries_is_the_documented_one(layer):
    # rho = rho_min: absorbed; rho = duplicate_rho: a duplicate only; below rho_min: nothing
    assert [(r.parent, r.child) for r in layer.absorption] == [ABSORBED]
    assert layer.pair_map["rho_min"] == MIN_RHO
    # dead atoms are no one's duplicate, even an exact copy of a live one
    assert [(r.i, r.j) for r in layer.duplicates] == [AT_DUPLICATE_RHO]
    # antipodal: rho <= -0.9, each on at least 5% of the audit tokens, together on at most 5% of
    # the rarer one's: a dense latent with a rare one is not, an overlap between 5% of the rarer and
    # 5% of the denser one's tokens is not, each bound met with equality is
    assert {(r.i, r.j) for r in layer.antipodal} == {AT_ANTIPODAL_RHO, AT_DENSE_SHARE, OVERLAP_AT_BOUND}
    # measured: (0, 1), (1, 0) and (20, 19); (19, 20) not (19 is on at all of 20's audit tokens),
    # nor the dead 18 with the live 16, nor the pair at rho = duplicate_rho, nor the one below rho_min
    assert layer.pair_map["measured_pairs"] == 3


def test_map_equals_its_rules_recomputed_by_brute_force(layer, world):
    atoms, _, _, z, held = world
    options = ab.MapOptions(min_rho=MIN_RHO)
    # rho_min = max(min_rho, spread_z * spread) = MIN_RHO: all but 9 of the 171 alive pairs are
    # exactly orthogonal, so the median |rho| of any sample of them, the spread, is 0
    measured, duplicates, antipodal = brute_force_map(atoms, z[~held], options, rho_min=MIN_RHO)
    assert layer.pair_map["measured_pairs"] == len(measured)
    assert {(r.parent, r.child) for r in layer.absorption} <= measured
    assert {(r.i, r.j) for r in layer.duplicates} == duplicates
    assert {(r.i, r.j) for r in layer.antipodal} == antipodal
    on = z[~held] > 0
    for r in layer.antipodal:
        both = int((on[:, r.i] & on[:, r.j]).sum())
        assert (r.count_i, r.count_j, r.co_count) == (int(on[:, r.i].sum()), int(on[:, r.j].sum()), both)
        assert r.share == (r.count_i + r.count_j - both) / len(on)


def brute_force_score(atoms, audit_z, measured, options: ab.MapOptions, rho_min: float):
    """The layer's absorption score by its definition (THEORY.md section 6), from dense counts: over
    the alive atoms j that lean on another alive atom (rho_min <= rho_ij < duplicate_rho),
    a_j = max over measured (i, j) with count_i > count_j of rho_ij * (share of j's audit tokens with
    i off), 0 without one; the mean over those atoms and its SE."""
    on = audit_z > 0
    count = on.sum(0)
    rho = atoms @ atoms.T
    alive = [k for k in range(len(atoms)) if count[k] > 0]
    terms = []
    for j in alive:
        if not any(i != j and rho_min <= rho[i, j] < options.duplicate_rho for i in alive):
            continue
        a = [float(rho[i, j]) * int((~on[:, i] & on[:, j]).sum()) / int(count[j])
             for i in alive if (i, j) in measured and count[i] > count[j]]
        terms.append(max(a, default=0.0))
    mean = sum(terms) / len(terms)
    sd = math.sqrt(sum((t - mean) ** 2 for t in terms) / (len(terms) - 1))
    return mean, sd / math.sqrt(len(terms)), len(terms), sum(t > 0 for t in terms)


def test_absorption_score_is_its_rule_recomputed_by_brute_force(layer, world):
    atoms, _, _, z, held = world
    options = ab.MapOptions(min_rho=MIN_RHO)
    measured, _, _ = brute_force_map(atoms, z[~held], options, rho_min=MIN_RHO)
    mean, se, n, positive = brute_force_score(atoms, z[~held], measured, options, rho_min=MIN_RHO)
    m = layer.pair_map
    # the leaning atoms: the absorbed pair (0, 1) and the strict pair (19, 20); 16 leans only on
    # dead atoms, (2, 3) sits at duplicate_rho and (4, 5) below rho_min
    assert (m["scored_latents"], m["absorbing_latents"]) == (n, positive) == (4, 1)
    assert m["absorption_score"] == pytest.approx(mean, rel=1e-12, abs=0)
    assert m["absorption_score_se"] == pytest.approx(se, rel=1e-9, abs=0)
    # by construction: the absorbed child 1 leans 0.5 on the more frequent 0, which is off on about
    # 80% of its tokens; the parent 0 leans on the rarer 1 and 20 fires only with 19: both add 0
    on = z[~held] > 0
    assert on[:, 0].sum() > on[:, 1].sum() and on[:, 19].sum() > on[:, 20].sum()
    child_term = 0.5 * int((on[:, 1] & ~on[:, 0]).sum()) / int(on[:, 1].sum())
    assert 0.35 < child_term < 0.45
    assert m["absorption_score"] == pytest.approx(child_term / 4, rel=1e-12)


def test_absorption_score_rules():
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    i64 = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    flags = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    # an absorbed child: rho times the share of its tokens with the more frequent parent off; the
    # parent's side of the same pair (its candidate is rarer) adds 0; 2 and 3 lean on no one: out
    absorbed = ab.absorption_score(i64(0, 1), i64(1, 0), f64(0.6, 0.6), i64(10, 10), i64(50, 40, 9, 0),
                                   flags(True, True, False, False))
    assert (absorbed.value, absorbed.n_latents, absorbed.n_absorbing) == (pytest.approx(0.6 * 30 / 40 / 2, rel=1e-15),
                                                                          2, 1)
    assert absorbed.se == pytest.approx(0.6 * 30 / 40 / 2, rel=1e-12)  # sd of (0.45, 0) / sqrt(2)
    # a kept hierarchy (the parent fires on every token of its child) adds 0 and still counts
    kept = ab.absorption_score(i64(0), i64(1), f64(0.6), i64(10), i64(40, 10, 3, 0), flags(True, True, False, False))
    assert (kept.value, kept.n_latents, kept.n_absorbing) == (0.0, 2, 0)
    # equal counts: neither is the more frequent, so neither is the other's parent
    tied = ab.absorption_score(i64(0, 1), i64(1, 0), f64(0.6, 0.6), i64(0, 0), i64(30, 30), flags(True, True))
    assert (tied.value, tied.n_absorbing) == (0.0, 0)
    # a latent leaning on two more frequent ones counts its largest term, once
    two = ab.absorption_score(i64(0, 1), i64(2, 2), f64(0.3, 0.6), i64(0, 25), i64(200, 150, 100, 0),
                              flags(True, True, True, False))
    assert two.value == pytest.approx(max(0.3 * 1.0, 0.6 * 0.75) / 3, rel=1e-15) and two.n_absorbing == 1
    # no atom leans on another: exactly 0, over no latents
    nothing = ab.absorption_score(*(torch.zeros(0, dtype=torch.int64),) * 2, torch.zeros(0, dtype=torch.float64),
                                  torch.zeros(0, dtype=torch.int64), i64(5, 0, 9), flags(False, False, False))
    assert (nothing.value, nothing.se, nothing.n_latents) == (0.0, 0.0, 0)
    # a dead atom never counts, even flagged as leaning
    dead = ab.absorption_score(i64(0), i64(1), f64(0.6), i64(0), i64(40, 10, 0), flags(True, True, True))
    assert (dead.value, dead.n_latents) == (pytest.approx(0.6 / 2, rel=1e-15), 2)
    none_alive = ab.absorption_score(*(torch.zeros(0, dtype=torch.int64),) * 2, torch.zeros(0), torch.zeros(0),
                                     torch.zeros(3, dtype=torch.int64), flags(True, True, True))
    assert math.isnan(none_alive.value) and none_alive.n_latents == 0


def test_min_touched_held_out_tokens_are_enough(world):
    # "at least min_touched held-out tokens carry its evidence": the count met with equality passes
    _, _, _, z, held = world
    p, c = ABSORBED
    touched = int(((z[held][:, c] > 0) & (z[held][:, p] == 0)).sum())
    at_bound = run(world, min_touched=touched)
    assert [(r.parent, r.child, r.n_evidence) for r in at_bound.absorption] == [(p, c, touched)]
    assert run(world, min_touched=touched + 1).absorption == []


def test_a_parent_that_fires_where_its_direction_is_absent_has_no_own_size(world):
    # the absorbed pair's parent latent also fires, in the codes only, on a third of its tokens
    # where the input does not carry its direction (as a matching-pursuit atom picked on a small
    # residual does): its own mean, the evidence's denominator, falls, so the evidence rises and
    # every other test still passes; the coefficient of variation of its direction over its own
    # held-out tokens names it. Met with equality the row stands, just below it goes
    atoms, bias, x, z, held = world
    p, c = ABSORBED
    gen = torch.Generator().manual_seed(5)
    free = torch.nonzero((z[:, p] == 0) & (z[:, c] == 0)).flatten()
    extra = free[torch.randperm(len(free), generator=gen)[: int((z[:, p] > 0).sum()) // 2]]
    codes = z.clone()
    codes[extra, p] = 0.5
    absent = (atoms, bias, x, codes, held)
    s = (x[held & (codes[:, p] > 0)] - bias) @ atoms[p]
    cv = float(s.std() / s.mean())  # sample sd over the mean, float64
    assert 0.6 < cv < 0.9  # a third of the tokens near 0, the rest near 1
    at_bound = run(absent, map_options={"max_parent_cv": cv * (1 + 1e-12)})
    [row] = at_bound.absorption
    assert (row.parent, row.child) == ABSORBED and row.evidence > 1.3  # the inflated evidence, read anyway
    assert run(absent, map_options={"max_parent_cv": cv * (1 - 1e-9)}).absorption == []
    assert run(absent).absorption == []  # the default, 0.5
    # the untouched world's parent has its own size (sizes ~ N(1, 0.15)): the row of the fixture
    s = (x[held & (z[:, p] > 0)] - bias) @ atoms[p]
    assert float(s.std() / s.mean()) < 0.25


def test_own_size_cv_is_sd_over_mean_and_none_without_an_own_size():
    own = torch.tensor([1.0, 1.2, 0.8, 1.1], dtype=torch.float64)
    negative, single = -own, own[:1]
    count = torch.tensor([4, 4, 1])
    total = torch.stack([own.sum(), negative.sum(), single.sum()])
    total_sq = torch.stack([(own**2).sum(), (negative**2).sum(), (single**2).sum()])
    cv = ab.own_size_cv(count, total, total_sq)
    assert float(cv[0]) == pytest.approx(float(own.std() / own.mean()), rel=1e-12)
    # a direction negative on its own tokens, or one token, has no own size: NaN, which no bound passes
    assert math.isnan(float(cv[1])) and math.isnan(float(cv[2]))
    with pytest.raises(ValueError, match="max_parent_cv"):
        ab.MapOptions(max_parent_cv=0.0)


def test_evidence_and_its_se_from_two_tokens_are_the_delta_method_ones():
    # the SE needs two tokens (sample variance, n - 1), and two are enough
    pair, own = torch.tensor([0.9, 1.15], dtype=torch.float64), torch.tensor([1.0, 1.2, 0.8, 1.1], dtype=torch.float64)
    ratio = ab.evidence_ratio(torch.tensor([2]), pair.sum()[None], (pair**2).sum()[None], torch.tensor([4]),
                              own.sum()[None], (own**2).sum()[None], 0.5)
    value = float(pair.mean() / own.mean())
    se = math.sqrt(float(pair.var() / 2 + value**2 * own.var() / 4)) / float(own.mean())
    assert float(ratio.value[0]) == pytest.approx(value, rel=1e-12)
    assert float(ratio.se[0]) == pytest.approx(se, rel=1e-9)
    assert float(ratio.z[0]) == pytest.approx((value - 0.5) / se, rel=1e-9)
    one = ab.evidence_ratio(torch.tensor([1]), pair[:1], pair[:1] ** 2, torch.tensor([4]), own.sum()[None],
                            (own**2).sum()[None], 0.5)
    assert math.isnan(float(one.se[0]))  # one token: no SE


def test_noise_free_evidence_at_min_evidence_passes_and_no_own_size_gives_none():
    # identical values: SE 0; evidence exactly at the threshold is "at least this share" (z = +inf)
    half, ones = torch.full((2,), 0.5, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    exact = ab.evidence_ratio(torch.tensor([2]), half.sum()[None], (half**2).sum()[None], torch.tensor([3]),
                              ones.sum()[None], (ones**2).sum()[None], 0.5)
    assert float(exact.value[0]) == 0.5 and float(exact.se[0]) == 0.0 and float(exact.z[0]) == math.inf
    # a share of the parent's own size needs a positive size: a parent whose direction is negative
    # on its own tokens gives no evidence, though the two negative means have a ratio above 0.5
    pair, own = torch.tensor([-1.0, -1.2], dtype=torch.float64), torch.tensor([-1.0, -0.8, -1.2], dtype=torch.float64)
    none = ab.evidence_ratio(torch.tensor([2]), pair.sum()[None], (pair**2).sum()[None], torch.tensor([3]),
                             own.sum()[None], (own**2).sum()[None], 0.5)
    assert math.isnan(float(none.value[0])) and not float(none.z[0]) >= 0.5


def test_min_rho_must_be_strictly_below_duplicate_rho():
    with pytest.raises(ValueError, match="duplicate_rho"):
        ab.MapOptions(min_rho=0.9, duplicate_rho=0.9)  # no rho would be an absorption candidate
    assert ab.MapOptions(min_rho=0.89, duplicate_rho=0.9).min_rho == 0.89


@pytest.mark.parametrize("rho", [0.0, -0.3, 1.0])
def test_split_child_refuses_a_pair_without_0_lt_rho_lt_1(rho):
    # at rho <= 0 the parent's part of the child's code would be <= 0; at rho = 1 there is no own part
    e = torch.eye(3, dtype=torch.float64)
    atoms = torch.stack([e[0], rho * e[0] + math.sqrt(1 - rho**2) * e[1]])
    with pytest.raises(ValueError, match="0 < rho < 1"):
        ab.split_child(atoms, torch.ones(4, 2, dtype=torch.float64), 0, 1)
