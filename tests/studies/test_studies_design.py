"""Study schema for published designs: fixed x, unions of linspaces, per-setting grids,
[fit.start] tables (assignment, masses, n-dependent noise), tries, stopping rule."""

import json
import math
import re

import numpy as np
import pytest
import torch

from moelab import fit_em
from moelab.studies import StudyError, load_preset, merge_results, parse_study, run_study
from moelab.studies import runner as runner_mod
from moelab.studies.simulate import simulate_cells, true_model, truth_perturbed, x_points
from moelab.studies.starts import assign_atoms

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib

START = {"assign": "resample", "mass": "copy", "draw": "shared", "gate": {"sd": 0.005, "n_power": -0.083},
         "experts": {"sd": 0.05, "n_power": -0.083}, "variance": {"sd": 0.005, "n_power": -0.25, "mode": "additive-abs"}}


def base():
    from conftest import TINY

    return tomllib.loads(TINY)


def paper_like():
    d = base()
    d["truth"]["x"] = {"design": "linspace", "low": 0.0, "high": 1.0}
    d["fit"][1].update(tries=3, convergence="relative", start=json.loads(json.dumps(START)), n=[120])
    return d


# ------------------------------------------------------------------ parsing
def test_new_keys_parse():
    s = parse_study(paper_like())
    assert s.truth.x == {"design": "linspace", "low": 0.0, "high": 1.0}
    exact, over = s.fits
    assert (exact.tries, exact.convergence, exact.start, exact.n) == (1, "mean", None, None)
    assert (over.tries, over.convergence, over.n, over.perturbation) == (3, "relative", [120], None)
    assert over.start["assign"] == "resample" and over.start["variance"]["mode"] == "additive-abs"
    assert over.start["temperature"] == {"sd": 0.0, "n_power": 0.0}  # default: none
    assert s.grid(exact) == [80, 160] and s.grid(over) == [120] and s.all_n() == [80, 120, 160]


def test_union_of_linspaces_is_rounded_deduplicated_sorted():
    d = base()
    d["study"]["n"] = [{"linspace": [1000, 2000, 3]}, 1500, {"linspace": [100, 300.4, 3]}, {"linspace": [90, 90, 1]}]
    assert parse_study(d).n == [90, 100, 200, 300, 1000, 1500, 2000]
    d["study"]["n"] = {"linspace": [1000, 100000, 195]}
    grid = parse_study(d).n
    assert grid == [int(v) for v in np.rint(np.linspace(1000, 100000, 195))] and len(grid) == 195


def test_fingerprint_has_new_keys_and_old_studies_keep_theirs():
    old = json.loads(parse_study(base()).fingerprint())
    assert not {"tries", "convergence", "start", "n"} & set(old["fits"][0])  # defaults left out: old study.json valid
    new = json.loads(parse_study(paper_like()).fingerprint())
    assert new["fits"][1]["tries"] == 3 and new["fits"][1]["start"]["mass"] == "copy" and new["fits"][1]["n"] == [120]
    d = paper_like()
    d["fit"][1]["start"]["gate"]["n_power"] = -0.1
    assert parse_study(d).fingerprint() != parse_study(paper_like()).fingerprint()


def test_quick_overrides_per_setting():
    d = paper_like()
    d["quick"] = {"replicates": 2, "fit": {"over": {"n": [{"linspace": [100, 140, 2]}], "tries": 2}}}
    q = parse_study(d, quick=True)
    assert q.replicates == 2 and q.grid(q.fits[1]) == [100, 140] and q.fits[1].tries == 2
    assert q.grid(q.fits[0]) == [80, 160]
    d["quick"]["n"] = [90]  # quick.n replaces every grid except quick.fit's
    q = parse_study(d, quick=True)
    assert q.grid(q.fits[0]) == [90] and q.grid(q.fits[1]) == [100, 140]
    full = parse_study(d)  # validated but not applied without --quick
    assert full.fits[1].tries == 3 and full.grid(full.fits[1]) == [120]


def _d2_truth(d):
    d["truth"]["gate"]["slope"] = [[25.0, 1.0], [0.0, 0.0]]
    d["truth"]["experts"]["slope"] = [[-20.0, 1.0], [20.0, 1.0]]


@pytest.mark.parametrize(
    "edit, key, fix",
    [
        (lambda d: d["truth"].update(x={"design": "grid"}), "truth.x.design", "one of"),
        (lambda d: d["truth"].update(x={"design": "linspace", "distribution": "uniform"}), "truth.x.design", "not both"),
        (lambda d: d["truth"].update(x={"design": "linspace", "mean": 0.0}), "truth.x.mean", "allowed keys"),
        (lambda d: d["truth"].update(x={"design": "linspace", "low": 1.0, "high": 0.0}), "truth.x.high", "must be >"),
        (lambda d: (d["truth"].update(x={"design": "linspace"}), _d2_truth(d)), "truth.x.design", "one feature"),
        (lambda d: d["study"].update(n=[{"linspace": [100, 200]}]), r"study.n\[0\].linspace", r"\[low, high, num\]"),
        (lambda d: d["study"].update(n=[{"linspace": [1, 200, 3]}]), r"study.n\[0\].linspace\[0\]", ">= 2"),
        (lambda d: d["study"].update(n={"linspace": [300, 200, 3]}), "study.n.linspace", "must be >= low"),
        (lambda d: d["study"].update(n={"linspace": [100, 200, 0]}), r"study.n.linspace\[2\]", ">= 1"),
        (lambda d: d["study"].update(n=[{"logspace": [100, 200, 3]}]), r"study.n\[0\].logspace", "allowed keys"),
        (lambda d: d["study"].update(n="100"), "study.n", "linspace"),
        (lambda d: d["fit"][1].update(n=[]), r"fit\[1\].n", "at least one"),
        (lambda d: d["fit"][1].update(n=[4]), r"fit\[1\].n", "free parameters"),
        (lambda d: (d["study"].pop("n"), d["fit"][0].pop("n", None)), "study.n", "or an n in every"),
        (lambda d: d["fit"][1].update(tries=0), r"fit\[1\].tries", ">= 1"),
        (lambda d: d["fit"][1].update(tries=2.0), r"fit\[1\].tries", "integer"),
        (lambda d: (d["fit"][1].update(init="kmeans"), d["fit"][1].pop("start")), r"fit\[1\].tries", "use n_init"),
        (lambda d: (d["fit"][1].update(estimator="mle", convergence="mean")), r"fit\[1\].tries", "estimator"),
        (lambda d: d["fit"][1].update(convergence="rel"), r"fit\[1\].convergence", "one of"),
        (lambda d: d["fit"][1].update(estimator="mle", tries=1), r"fit\[1\].convergence", "EM stopping rule"),
        (lambda d: d["fit"][1].update(perturbation=0.1), r"fit\[1\].start", "not both"),
        (lambda d: d["fit"][1].update(init="kmeans", tries=1), r"fit\[1\].start", "truth-perturbed"),
        (lambda d: d["fit"][1]["start"].update(assign="random"), r"fit\[1\].start.assign", "one of"),
        (lambda d: d["fit"][1]["start"].update(mass="half"), r"fit\[1\].start.mass", "one of"),
        (lambda d: d["fit"][1]["start"].update(draw="joint"), r"fit\[1\].start.draw", "one of"),
        (lambda d: d["fit"][1]["start"].update(seed=1), r"fit\[1\].start.seed", "allowed keys"),
        (lambda d: d["fit"][1]["start"].pop("gate"), r"fit\[1\].start.gate", "missing"),
        (lambda d: d["fit"][1]["start"].update(gate=0.1), r"fit\[1\].start.gate", "must be a table"),
        (lambda d: d["fit"][1]["start"]["gate"].pop("sd"), r"fit\[1\].start.gate.sd", "missing"),
        (lambda d: d["fit"][1]["start"]["gate"].update(sd=-0.1), r"fit\[1\].start.gate.sd", ">= 0"),
        (lambda d: d["fit"][1]["start"]["experts"].update(n_power="-1/12"), r"fit\[1\].start.experts.n_power", "number"),
        (lambda d: d["fit"][1]["start"]["experts"].update(mode="additive-abs"), r"fit\[1\].start.experts.mode", "allowed"),
        (lambda d: d["fit"][1]["start"]["variance"].update(mode="abs"), r"fit\[1\].start.variance.mode", "one of"),
        (lambda d: d.update(quick={"fit": {"exactt": {"n": [100]}}}), "quick.fit.exactt", "no \\[\\[fit\\]\\] is named"),
        (lambda d: d.update(quick={"fit": {"exact": {"reps": 2}}}), "quick.fit.exact.reps", "allowed keys"),
        (lambda d: d.update(quick={"fit": [1]}), "quick.fit", "table of settings"),
        (lambda d: d.update(quick={"fit": {"over": {"tries": 0}}}), "quick.fit.over.tries", ">= 1"),
        (lambda d: (d["fit"][0].update(init="kmeans"), d.update(quick={"fit": {"exact": {"tries": 2}}})),
         "quick.fit.exact.tries", "use tries = 1"),
    ],
)
def test_invalid_new_keys_name_key_and_fix(edit, key, fix):
    d = paper_like()
    edit(d)
    with pytest.raises(StudyError) as info:
        parse_study(d)
    msg = str(info.value)
    assert re.match(key + ":", msg), msg
    assert re.search(fix, msg), msg


# ------------------------------------------------------------------ data and starts
def test_fixed_design_is_linspace_in_every_replicate():
    s = parse_study(paper_like())
    truth = true_model(s.truth)
    x, y = simulate_cells(s, truth, 97, [0, 1, 2])
    grid = torch.linspace(0, 1, 97, dtype=torch.float64)
    assert x.shape == (3, 97, 1) and all(torch.equal(x[r, :, 0], grid) for r in range(3))
    assert not torch.equal(y[0], y[1])
    assert torch.allclose(x_points(s.truth.x, 4, 1)[:, 0], torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))


@pytest.mark.parametrize("K, p_ref_dup", [(3, 2 / 3), (4, 6 / 7)])
def test_resample_assignment_covers_and_duplicates_the_reference(K, p_ref_dup):
    """Authors' rule: last = reference, all covered; P(reference started twice) = 2/3 (K=3), 6/7 (K=4).

    3000 fixed-seed draws: the binomial sd is <= 0.0086, tolerance 0.035 (4 sd).
    """
    gen = torch.Generator().manual_seed(0)
    draws = [assign_atoms(2, K, "resample", gen) for _ in range(3000)]
    assert all(a[-1] == 1 and set(a) == {0, 1} and len(a) == K for a in draws)
    frac = np.mean([a.count(1) > 1 for a in draws])
    assert abs(frac - p_ref_dup) < 0.035, frac
    cover = [assign_atoms(2, K, "cover", gen) for _ in range(3000)]
    assert all(a[-1] == 1 and set(a) == {0, 1} for a in cover)
    assert abs(np.mean([a.count(1) > 1 for a in cover]) - (1 - 0.5 ** (K - 2))) < 0.035


def _start(fit_over, n, seeds):
    s = parse_study(paper_like())
    fit = s.fits[1]
    fit.__dict__.update(fit_over)
    return truth_perturbed(true_model(s.truth), fit, seeds, n), true_model(s.truth)


def test_noise_scales_as_sd_times_n_power_exactly():
    """Same seed at two n: every noise term scales by exactly (n2/n1)^power of its group."""
    m1, truth = _start({}, 1000, [5])
    m2, _ = _start({}, 64000, [5])
    f_g, f_e, f_v = (64.0 ** -0.083), (64.0 ** -0.083), (64.0 ** -0.25)
    atoms = [0 if abs(float(b) - 15.0) < 1 else 1 for b in m1.experts.intercept[0]]
    tb, ta, tv = truth.experts.intercept[atoms], truth.experts.slope[atoms, 0], truth.experts.variance[atoms]
    e1, e2 = m1.experts.intercept[0] - tb, m2.experts.intercept[0] - tb
    assert torch.allclose(e2, f_e * e1, rtol=1e-9, atol=0) and float(e1.abs().min()) > 0
    assert torch.allclose(m1.experts.slope[0, :, 0] - ta, e1, rtol=1e-12, atol=1e-12)  # shared draw
    v1, v2 = m1.experts.variance[0] - tv, m2.experts.variance[0] - tv
    assert bool((v1 > 0).all()) and torch.allclose(v2, f_v * v1, rtol=1e-9, atol=0)
    tg = truth.gate.intercept[atoms[:-1]]  # mass = "copy": the true logits, no -log(copies)
    g1, g2 = m1.gate.intercept[0, :-1] - tg, m2.gate.intercept[0, :-1] - tg
    assert torch.allclose(g2, f_g * g1, rtol=1e-9, atol=0)
    assert float(m1.gate.intercept[0, -1]) == 0.0 and float(m1.gate.slope[0, -1, 0]) == 0.0


def test_noise_sd_statistically():
    """sd of the gate/expert/variance noise over 4000 starts at n = 10^4 (tolerance 6%: > 3 sd of a sd estimate)."""
    n = 10_000
    m, truth = _start({"start": {**START, "draw": "independent", "assign": "cover", "mass": "split"}}, n, range(4000))
    # cover with K=3: atoms (0, extra, 1) ordered non-reference first; expert 0 starts from true expert 0
    e = (m.experts.intercept[:, 0] - 15.0).std()
    g = (m.gate.slope[:, 0, 0] - 25.0).std()
    v = (m.experts.variance[:, -1] - 0.16)
    assert abs(float(e) / (0.05 * n ** -0.083) - 1) < 0.06
    assert abs(float(g) / (0.005 * n ** -0.083) - 1) < 0.06
    assert bool((v >= 0).all()) and abs(float(v.mean()) / (0.005 * n ** -0.25 * math.sqrt(2 / math.pi)) - 1) < 0.06


def test_split_mass_shares_the_true_logit():
    m, truth = _start({"start": {**START, "assign": "cover", "mass": "split", "gate": {"sd": 0.0, "n_power": 0.0}}},
                      1000, range(40))
    for r in range(40):
        icpt = m.gate.intercept[r]
        means = m.experts.intercept[r]
        ref_copies = int((means < 5).sum())  # copies of the reference (intercept -5)
        if ref_copies == 2:  # reference split in two: the other expert's logit is -8 + log 2
            assert float(icpt[0]) == pytest.approx(-8 + math.log(2), abs=1e-12)
        else:  # expert 0 split in two
            assert icpt[:2].tolist() == pytest.approx([-8 - math.log(2)] * 2, abs=1e-12)


# ------------------------------------------------------------------ runs
def _run(d, out, **kw):
    s = parse_study(d)
    return s, run_study(s, out, progress=False, report=False, **kw)


def test_per_setting_grids_and_best_of_tries(tmp_path):
    d = paper_like()
    d["study"]["replicates"] = 2
    s, res = _run(d, tmp_path / "a")
    cells = sorted(zip(res.setting, res.n, res.replicate))
    assert cells == sorted([("exact", n, r) for n in (80, 160) for r in (0, 1)] + [("over", 120, r) for r in (0, 1)])
    # the kept fit of every replicate has the highest log-likelihood of its tries (refit each try alone)
    fi, fit = 1, s.fits[1]
    truth = true_model(s.truth)
    x, y = simulate_cells(s, truth, 120, [0, 1])
    starts = runner_mod._starts(s, fi, fit, truth, 120, [0, 1])
    assert tuple(starts.batch_shape) == (2, 3)
    for r in (0, 1):
        lls = []
        for t in range(3):
            one = type(starts)(starts.gate.map_tensors(lambda v: v[r, t]), starts.experts.map_tensors(lambda v: v[r, t]))
            lls.append(float(fit_em(x[r], y[r], 3, init_model=one, max_iter=fit.max_iter, tol=fit.tol,
                                    convergence="relative", accelerate=None, warn=False).loglik))  # studies: plain EM
        row = res[(res.setting == "over") & (res.replicate == r)].iloc[0]
        assert row["loglik"] == pytest.approx(max(lls), abs=1e-8)
        assert max(lls) - min(lls) > 0  # three different starts
    # try 0 is the one-try start
    fit1 = parse_study(paper_like()).fits[1]
    fit1.tries = 1
    single = runner_mod._starts(s, fi, fit1, truth, 120, [0, 1])
    assert torch.equal(single.experts.intercept, starts.experts.intercept[:, 0])


def test_results_do_not_depend_on_batching(tmp_path):
    d = paper_like()
    d["study"]["replicates"] = 2
    _, a = _run(d, tmp_path / "a")
    d["study"]["batch_size"] = 1
    _, b = _run(d, tmp_path / "b")
    key = ["setting", "n", "replicate"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert np.allclose(a["loglik"], b["loglik"], rtol=1e-10, atol=0)


def test_the_paper_preset():
    (full,), (quick,) = load_preset("softmax-2023-paper"), load_preset("softmax-2023-paper", quick=True)
    k2, k3, k4 = full.fits
    assert full.truth.x["design"] == "linspace" and full.replicates == 40
    assert full.grid(k2)[:6] == [100, 300, 500, 700, 900, 1000] and len(full.grid(k2)) == 200
    assert full.grid(k3) == full.grid(k4) and len(full.grid(k3)) == 200 and full.grid(k3)[0] == 10000
    assert max(full.grid(k2)) == max(full.grid(k3)) == 100000
    assert (k2.tries, k3.tries, k4.tries) == (1, 5, 5)
    assert all(f.convergence == "relative" and f.tol == 1e-6 and f.max_iter == 2000 for f in full.fits)
    assert all(f.start["assign"] == "resample" and f.start["mass"] == "copy" for f in full.fits)
    # quick: same ranges, fewer points and replicates
    for f, q in zip(full.fits, quick.fits):
        assert min(quick.grid(q)) == min(full.grid(f)) and max(quick.grid(q)) == max(full.grid(f))
        assert len(quick.grid(q)) < len(full.grid(f)) and q.tries == f.tries
    assert quick.replicates < full.replicates


def test_shards_of_per_setting_grids_merge_to_the_full_run(tmp_path):
    d = paper_like()
    d["study"]["replicates"] = 2
    s, full = _run(d, tmp_path / "full")
    for i in range(3):
        run_study(s, tmp_path / f"s{i}", shard=(i, 3), progress=False)
    merged = merge_results([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    key = ["setting", "n", "replicate"]
    full = full.sort_values(key).reset_index(drop=True)
    assert merged[key].values.tolist() == full[key].values.tolist()
    assert np.allclose(merged["loglik"], full["loglik"], rtol=1e-10, atol=0)


# ------------------------------------------------------------------ EM acceleration
def test_accelerate_key_defaults_to_plain_em_and_reaches_fit_em(monkeypatch, tmp_path):
    assert all(f.accelerate == "off" for f in parse_study(base()).fits)
    d = base()
    d["fit"][0]["accelerate"] = "squarem"
    s = parse_study(d)
    assert [f.accelerate for f in s.fits] == ["squarem", "off"]
    seen = []
    orig = runner_mod.fit_em

    def spy(*a, **k):
        seen.append(k.get("accelerate", "missing"))
        return orig(*a, **k)

    monkeypatch.setattr(runner_mod, "fit_em", spy)
    run_study(s, tmp_path / "run", progress=False)
    assert set(seen) == {"squarem", None}
    d["fit"][0]["accelerate"] = "anderson"
    with pytest.raises(StudyError, match=r"fit\[0\]\.accelerate"):
        parse_study(d)
