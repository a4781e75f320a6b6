"""The study file: a TOML description of a rate study, validated before any fitting.

Schema (every key listed; anything else is rejected)::

    [study]
    name = "softmax-2023"          # str
    seed = 0                       # int
    replicates = 40                # int >= 1
    n = [100, 1000, 10000]         # list of ints >= 2, or
    # n = { min = 100, max = 100000, num = 10 }   (log-spaced, rounded)
    # n = [{ linspace = [100, 900, 5] }, { linspace = [1000, 100000, 195] }, 250000]
    #     (a list may mix integers and linspace tables: numpy.linspace(low, high, num)
    #      rounded to the nearest integer; the union is de-duplicated and sorted)
    # optional when every [[fit]] has its own n
    batch_size = 0                 # replicates fitted per call (0: all)
    x_points = 64                  # points representing the x distribution in density distances

    [truth]
    x = { distribution = "uniform", low = 0.0, high = 1.0 }   # or "normal", mean, sd
    # x = { design = "linspace", low = 0.0, high = 1.0 }      fixed design: x = linspace(low, high, n)
    #     in every replicate (d = 1; only y is random); density distances average x over
    #     Uniform(low, high), the design's limit
    [truth.gate]
    family = "softmax"             # softmax | temperature | activation
    slope = [[25.0], [0.0]]        # (K*, d); last row = reference expert
    intercept = [-8.0, 0.0]        # (K*,)
    temperature = 1.0              # temperature/activation only, > 0
    activation = "tanh"            # activation only
    # a gate that models x (family = "gaussian") is given by its own parameters instead, and x is
    # drawn from it (truth.x omitted or x = { distribution = "gate" }):
    # [truth.gate]
    # family = "gaussian"
    # proportions = [0.3, 0.4, 0.3]                  # π (K*,), > 0, sum 1
    # means = [[-0.1], [0.1], [0.5]]                 # c (K*, d)
    # covariances = [[[0.042824]], [[0.0175]], [[0.01]]]   # Γ (K*, d, d), symmetric positive definite
    [truth.experts]
    slope = [[-20.0], [20.0]]      # (K*, d)
    intercept = [15.0, -5.0]       # (K*,)
    sd = [0.3, 0.4]                # or variance = [...]; > 0
    # kind = "relu"                # regression truth y = Σ_k g_k(x) h(x, η_k) + ε (moelab.RegressionMoE):
                                   # linear | polynomial | relu | gelu | tanh | sigmoid; then no sd/variance but
    # noise_sd = 0.1               # the sd of ε, and degree = 2 for polynomial (slope rows: x, x², ... blocks);
                                   # the gate may then be "sigmoid" (not normalised) or "softmax"; fits use
                                   # estimator = "lse" (fit_lse), truth-perturbed starts (perturbation) and the
                                   # loss D2 of the least-squares theory (moelab.metrics.lse_exponents)

    [[fit]]                        # one table per fitted-model setting
    name = "exact"                 # unique
    n_experts = 2
    gate = "softmax"               # default: the true family
    gate_options = {}              # e.g. { learn_temperature = true, activation = "tanh" }
    estimator = "em"               # em | mle | lse (least squares: regression truths, see [truth.experts] kind)
    init = "truth-perturbed"       # truth-perturbed | kmeans | random | segments | lines | auto
    n_init = 1
    perturbation = 0.1             # truth-perturbed: sd of the additive noise (relative for ν)
    loss = "auto"                  # auto (D1 if n_experts == K*, else D2) | D1 | D2 (for estimator lse:
                                   # D2 = moelab.metrics.lse_loss, exponent 2 on multi-atom cells)
    max_iter = 500
    tol = 1e-8
    convergence = "mean"           # stopping rule (estimator em): "mean": |Δ mean loglik| < tol;
                                   # "relative": |Δℓ| < tol·|ℓ| (meteorits' rule; fit_em's convergence)
    accelerate = "off"             # estimator em: "off" (plain EM, as the papers' EM codes; the default for
                                   # studies) | "squarem" (fit_em's default: SQUAREM extrapolation, never
                                   # lowering the log-likelihood; moelab.acceleration)
    n = { linspace = [1000, 100000, 20] }   # this setting's own n grid (same forms as [study].n)
    tries = 1                      # truth-perturbed starts per replicate (estimator em), fitted in one
                                   # batch; the fit with the highest log-likelihood is kept (collapsed
                                   # fits only if every try collapsed, as fit_em's n_init)
    routing_start = "dense-fit"    # sparse-routing gates (topk) with init = "truth-perturbed", estimator em:
                                   # "dense-fit" (default): the start, read as a dense softmax model, is fitted
                                   # by EM first and its top-K sparsification starts the top-K EM (EM keeps
                                   # each sample's routing set, so otherwise the start's routing is never
                                   # revised); "start": top-K EM from the start itself (its routing kept)

    [fit.start]                    # optional, truth-perturbed only: the start in full (replaces perturbation)
    assign = "cover"               # which true expert each fitted one starts from (gaussian gate: "resample-all",
                                   #   K uniform draws until every true expert appears, no reference):
                                   # "cover": every true expert once, the extra ones drawn uniformly;
                                   # "resample": all K drawn uniformly with the last fixed to the true
                                   #   reference, redrawn until every true expert is drawn
    mass = "split"                 # "split": copies of a true expert share its gate mass exp(β0) equally;
                                   # "copy": every copy keeps the true gate logit
    draw = "independent"           # "independent": one draw per coefficient; "shared": one draw per
                                   #   expert and group, added to all its coefficients in that group
    gate = { sd = 0.005, n_power = -0.083 }      # N(0, (sd·n^n_power)²) on the non-reference gate rows
    experts = { sd = 0.05, n_power = -0.083 }    # on expert slopes and intercepts
    variance = { sd = 0.005, n_power = -0.25, mode = "additive-abs" }
                                   # mode "additive-abs": ν + |N(0, s²)|; "multiplicative": ν·exp(N(0, s²))
    temperature = { sd = 0.0, n_power = 0.0 }    # estimated τ only: τ·exp(N(0, s²)); default 0
    covariance = { sd = 0.0005, n_power = -0.25 }  # gaussian gate only (required there): Γ + diag|N(0, s²)|;
                                   # "gate" is then the noise on the gate means c

    [fit.theory]                   # optional: the theory's rate per rates.csv quantity (moelab.studies.theory)
    loss_D1 = { slope = -0.5, source = "NeurIPS 2023, exact-specified" }   # slope <= 0, or
    err_temperature = { rate = "slower-than-polynomial", source = "ICML 2024, abstract" }  # or "polynomial"

    [quick]                        # optional overrides for --quick
    n = [100, 1000]                # replaces [study].n and every setting's own n
    replicates = 4
    max_iter = 200
    tol = 1e-6
    fit = { exact = { n = [100, 1000], tries = 1 } }   # per setting (by name): n and tries

Without ``[fit.start]`` a truth-perturbed start is moelab's: ``assign =
"cover"``, ``mass = "split"``, N(0, perturbation²) on every gate row (then
re-referenced to the last expert), expert slope and intercept, and ν·exp(N(0,
perturbation²)). With ``[fit.start]`` the gate noise goes to the K−1
non-reference rows only (the free parameters; the last row stays 0), and
every group must be given.

Errors are :class:`StudyError` (a ``ValueError``) naming the key and the fix.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["Study", "FitSpec", "TruthSpec", "StudyError", "load_study", "parse_study", "fingerprint_of", "study_from_json"]

INITS = ("truth-perturbed", "kmeans", "random", "segments", "lines", "auto")
ESTIMATORS = ("em", "mle", "lse")
LOSSES = ("auto", "D1", "D2")
DESIGNS = ("linspace",)
CONVERGENCE = ("mean", "relative")
ACCELERATE = ("off", "squarem")
START_ASSIGN = ("cover", "resample", "resample-all")
START_MASS = ("split", "copy")
START_DRAW = ("independent", "shared")
VARIANCE_MODES = ("multiplicative", "additive-abs")
ROUTING_STARTS = ("dense-fit", "start")


def _families():
    """Gate families a study can use: the registered ones with ``rate_studies`` (moelab.gates.GATES)."""
    from ..gates import GATES

    return tuple(n for n, c in GATES.items() if c.rate_studies)


def _activation_names():
    from ..activations import ACTIVATIONS

    return tuple(ACTIVATIONS)


class StudyError(ValueError):
    """An invalid study file; the message names the key and how to fix it."""


@dataclass
class TruthSpec:
    gate: str
    gate_slope: List[List[float]]
    gate_intercept: List[float]
    temperature: Optional[float]
    activation: Optional[str]
    expert_slope: List[List[float]]
    expert_intercept: List[float]
    variance: List[float]
    x: Dict[str, Any]
    #: the true gate's other options (families registered beyond the built-in ones); omitted from study.json when empty
    gate_options: Dict[str, Any] = field(default_factory=dict)
    #: "gaussian" (a Gaussian MoE, fitted by likelihood) or a regression expert kind of moelab.regression
    #: (y = Σ g_k h(x, η_k) + ε, fitted by least squares); with its degree and the noise sd of ε
    expert_kind: str = "gaussian"
    degree: Optional[int] = None
    noise_sd: Optional[float] = None
    #: parameters of a gate that models x (family "gaussian": proportions, means, covariances); then
    #: gate_slope and gate_intercept are empty and x is drawn from the gate; omitted from study.json when empty
    gate_params: Dict[str, Any] = field(default_factory=dict)

    @property
    def regression(self) -> bool:
        """True for a regression (least-squares) truth."""
        return self.expert_kind != "gaussian"

    @property
    def n_experts(self) -> int:
        return len(self.gate_params["proportions"]) if self.gate_params else len(self.gate_intercept)

    @property
    def n_features(self) -> int:
        return len(self.gate_params["means"][0]) if self.gate_params else len(self.gate_slope[0])


@dataclass
class FitSpec:
    name: str
    n_experts: int
    gate: str
    gate_options: Dict[str, Any] = field(default_factory=dict)
    estimator: str = "em"
    init: str = "truth-perturbed"
    n_init: int = 1
    perturbation: Optional[float] = 0.1
    loss: str = "auto"
    max_iter: int = 500
    tol: float = 1e-8
    theory: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    convergence: str = "mean"
    n: Optional[List[int]] = None
    tries: int = 1
    start: Optional[Dict[str, Any]] = None
    routing_start: Optional[str] = None
    accelerate: str = "off"

    def loss_name(self, n_true: int) -> str:
        if self.loss != "auto":
            return self.loss
        return "D1" if self.n_experts == n_true else "D2"


@dataclass
class Study:
    name: str
    seed: int
    replicates: int
    n: List[int]
    truth: TruthSpec
    fits: List[FitSpec]
    batch_size: int = 0
    x_points: int = 64

    def grid(self, fit: FitSpec) -> List[int]:
        """The sample sizes of setting ``fit``: its own ``n``, else ``[study].n``."""
        return list(fit.n) if fit.n is not None else list(self.n)

    def all_n(self) -> List[int]:
        """Sorted union of every setting's sample sizes (the cells of the run, with the replicates)."""
        return sorted({n for f in self.fits for n in self.grid(f)})

    def to_dict(self) -> dict:
        """Plain-dict form; setting keys added after the first schema are left out at their
        defaults, so study files that do not use them keep their earlier ``study.json``."""
        d = asdict(self)
        if not d["truth"].get("gate_options"):
            del d["truth"]["gate_options"]
        for k, v in (("expert_kind", "gaussian"), ("degree", None), ("noise_sd", None)):
            if d["truth"].get(k) == v:
                del d["truth"][k]
        if not d["truth"].get("gate_params"):
            del d["truth"]["gate_params"]
        for f in d["fits"]:
            for k, v in _LATER_FIT_DEFAULTS.items():
                if f.get(k) == v:
                    del f[k]
        return d

    def to_json(self) -> str:
        """The study as canonical JSON (what ``study.json`` holds; theory claims included)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        """Canonical JSON of everything that determines the results (theory claims left out)."""
        return fingerprint_of(self.to_json())


def fingerprint_of(study_json: str) -> str:
    """The fingerprint of a stored ``study.json`` text: its JSON without the theory claims."""
    data = json.loads(study_json)
    for f in data.get("fits", []):
        f.pop("theory", None)
    return json.dumps(data, sort_keys=True)


def study_from_json(study_json: str) -> "Study":
    """Rebuild a :class:`Study` from a ``study.json`` text."""
    data = json.loads(study_json)
    return Study(**{**data, "truth": TruthSpec(**data["truth"]), "fits": [FitSpec(**f) for f in data["fits"]]})


#: FitSpec keys added after the first schema, with their defaults (omitted from study.json there)
_LATER_FIT_DEFAULTS = {"convergence": "mean", "n": None, "tries": 1, "start": None, "routing_start": None,
                       "accelerate": "off"}


# ------------------------------------------------------------------ helpers
def _err(key: str, msg: str) -> StudyError:
    return StudyError(f"{key}: {msg}")


def _check_keys(table: dict, allowed, where: str) -> None:
    if not isinstance(table, dict):
        raise _err(where, f"must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _err(f"{where}.{unknown[0]}", f"unknown key; allowed keys in [{where}] are {sorted(allowed)}")


def _int(v, key, lo=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(key, f"must be an integer, got {v!r} ({type(v).__name__})")
    if lo is not None and v < lo:
        raise _err(key, f"must be >= {lo}, got {v}")
    return v


def _num(v, key, positive=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(key, f"must be a number, got {v!r} ({type(v).__name__})")
    v = float(v)
    if not math.isfinite(v):
        raise _err(key, f"must be finite, got {v}")
    if positive and not v > 0:
        raise _err(key, f"must be > 0, got {v}")
    return v


def _str(v, key, choices=None) -> str:
    if not isinstance(v, str):
        raise _err(key, f"must be a string, got {v!r} ({type(v).__name__})")
    if choices is not None and v not in choices:
        raise _err(key, f"must be one of {list(choices)}, got {v!r}")
    return v


def _vector(v, key, length=None, positive=False) -> List[float]:
    if not isinstance(v, list) or not v:
        raise _err(key, f"must be a non-empty list of numbers, got {v!r}")
    out = [_num(e, f"{key}[{i}]", positive) for i, e in enumerate(v)]
    if length is not None and len(out) != length:
        raise _err(key, f"must have {length} entries (one per true expert), got {len(out)}")
    return out


def _matrix(v, key, rows=None) -> List[List[float]]:
    if not isinstance(v, list) or not v:
        raise _err(key, f"must be a non-empty list of rows (one per expert), e.g. [[25.0], [0.0]]; got {v!r}")
    if not all(isinstance(r, list) for r in v):
        raise _err(key, f"must be a list of rows (one list of n_features numbers per expert), e.g. [[25.0], [0.0]]; got {v!r}")
    out = [_vector(r, f"{key}[{i}]") for i, r in enumerate(v)]
    if rows is not None and len(out) != rows:
        raise _err(key, f"must have {rows} rows (one per true expert), got {len(out)}")
    d = len(out[0])
    if any(len(r) != d for r in out):
        raise _err(key, "rows have different lengths; every row needs n_features entries")
    return out


def _linspace(v, key) -> List[int]:
    """{ linspace = [low, high, num] } → numpy.linspace(low, high, num) rounded to integers."""
    _check_keys(v, ("linspace",), key)
    spec = v["linspace"]
    if not (isinstance(spec, list) and len(spec) == 3):
        raise _err(f"{key}.linspace", f"must be [low, high, num], e.g. [1000, 100000, 195]; got {spec!r}")
    lo, hi = _num(spec[0], f"{key}.linspace[0]"), _num(spec[1], f"{key}.linspace[1]")
    num = _int(spec[2], f"{key}.linspace[2]", 1)
    if lo < 2:
        raise _err(f"{key}.linspace[0]", f"must be >= 2 (a sample size), got {spec[0]!r}")
    if hi < lo:
        raise _err(f"{key}.linspace", f"high ({spec[1]!r}) must be >= low ({spec[0]!r})")
    import numpy as np

    return [int(v) for v in np.rint(np.linspace(lo, hi, num))]


def _n_grid(v, key) -> List[int]:
    if isinstance(v, dict) and "linspace" in v:
        return sorted(set(_linspace(v, key)))
    if isinstance(v, dict):
        _check_keys(v, ("min", "max", "num"), key)
        for k in ("min", "max", "num"):
            if k not in v:
                raise _err(f"{key}.{k}", "missing; a log-spaced grid needs min, max and num")
        lo, hi, num = _int(v["min"], f"{key}.min", 2), _int(v["max"], f"{key}.max", 2), _int(v["num"], f"{key}.num", 1)
        if hi < lo:
            raise _err(key, f"max ({hi}) must be >= min ({lo})")
        grid = sorted({int(round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / max(num - 1, 1)))) for i in range(num)})
    elif isinstance(v, list):
        if not v:
            raise _err(key, "is empty; give at least one sample size, e.g. n = [100, 1000, 10000]")
        grid = set()
        for i, e in enumerate(v):
            grid.update(_linspace(e, f"{key}[{i}]") if isinstance(e, dict) else [_int(e, f"{key}[{i}]", 2)])
        grid = sorted(grid)
    else:
        raise _err(key, f"must be a list of integers and {{ linspace = [low, high, num] }} tables, or a table "
                        f"{{min, max, num}} (log-spaced); got {v!r}")
    return grid


def _truth(t: dict) -> TruthSpec:
    _check_keys(t, ("x", "gate", "experts"), "truth")
    for k in ("gate", "experts"):
        if k not in t:
            raise _err(f"truth.{k}", "missing; the true model needs [truth.gate] and [truth.experts]")
    g = t["gate"]
    fam = _str(g.get("family", "softmax") if isinstance(g, dict) else "softmax", "truth.gate.family", _families())
    from ..gates import gate_family

    model_options = [o for o in gate_family(fam).options if not o.of_estimation]
    if gate_family(fam).models_x:
        return _gaussian_truth(t, fam)
    _check_keys(g, ("family", "slope", "intercept", "temperature", "activation") + tuple(o.name for o in model_options),
                "truth.gate")
    if "activation" in g and fam != "activation":
        raise _err("truth.gate.activation", f"only family = \"activation\" takes an activation (family is {fam!r})")
    for k in ("slope", "intercept"):
        if k not in g:
            raise _err(f"truth.gate.{k}", "missing")
    gs = _matrix(g["slope"], "truth.gate.slope")
    K = len(gs)
    gi = _vector(g["intercept"], "truth.gate.intercept", K)
    if any(v != 0 for v in gs[-1]) and fam == "activation":
        raise _err("truth.gate.slope", "the last (reference) expert's slope must be 0 for activation gates (σ(0) is the reference)")
    temp = None
    has_temperature = any(o.name == "temperature" for o in model_options)
    if "temperature" in g:
        if not has_temperature:
            raise _err("truth.gate.temperature", f"the {fam} gate has no temperature; use family = \"temperature\" or remove the key")
        temp = _num(g["temperature"], "truth.gate.temperature", positive=True)
    elif has_temperature:
        temp = 1.0
    act = None
    if "activation" in g:
        if fam != "activation":
            raise _err("truth.gate.activation", f"only family = \"activation\" takes an activation (family is {fam!r})")
        act = _str(g["activation"], "truth.gate.activation", _activation_names())
    elif fam == "activation":
        raise _err("truth.gate.activation", f"missing; choose one of {list(_activation_names())}")
    other = {}
    for o in model_options:
        if o.name in ("temperature", "activation"):
            continue
        if o.name in g:
            other[o.name] = _option(o, g[o.name], f"truth.gate.{o.name}", K)
        elif o.required:
            raise _err(f"truth.gate.{o.name}", f"missing; the {fam!r} gate needs {o.name} ({o.help})")
    e = t["experts"]
    _check_keys(e, ("kind", "degree", "noise_sd", "slope", "intercept", "sd", "variance"), "truth.experts")
    for k in ("slope", "intercept"):
        if k not in e:
            raise _err(f"truth.experts.{k}", "missing")
    from ..regression import EXPERT_KINDS, check_expert_kind

    kind = _str(e.get("kind", "gaussian"), "truth.experts.kind", ("gaussian",) + EXPERT_KINDS)
    degree, noise_sd = None, None
    if kind == "gaussian":
        for k in ("degree", "noise_sd"):
            if k in e:
                raise _err(f"truth.experts.{k}", f"only regression experts (kind = one of {list(EXPERT_KINDS)}) take {k}")
        if not set(gate_family(fam).estimators) & {"em", "mle"}:  # least squares only (the sigmoid gate)
            raise _err("truth.gate.family", f"the {fam} gate is not normalised, so it has no Gaussian mixture density; "
                                            f"give regression experts (truth.experts.kind, one of {list(EXPERT_KINDS)})")
    else:
        try:
            degree = check_expert_kind(kind, e.get("degree"))
        except ValueError as exc:
            raise _err("truth.experts.degree", str(exc)) from None
        if "sd" in e or "variance" in e:
            raise _err("truth.experts.sd" if "sd" in e else "truth.experts.variance",
                       "regression experts have one additive noise: give noise_sd (the sd of ε in y = f(x) + ε) instead")
        if "noise_sd" not in e:
            raise _err("truth.experts.noise_sd", "missing; the sd of the noise ε in y = Σ g_k h(x, η_k) + ε, e.g. noise_sd = 0.1")
        noise_sd = _num(e["noise_sd"], "truth.experts.noise_sd", positive=True)
        if fam not in ("sigmoid", "softmax"):
            raise _err("truth.gate.family", f"regression (least-squares) truths take a sigmoid or softmax gate, got {fam!r}")
    es = _matrix(e["slope"], "truth.experts.slope", K)
    if len(es[0]) != (degree or 1) * len(gs[0]):
        raise _err("truth.experts.slope", f"rows have {len(es[0])} entries but truth.gate.slope rows have {len(gs[0])}; "
                                          "both need n_features" + (f" (times degree = {degree}: x, x², ...)" if degree and degree > 1 else ""))
    ei = _vector(e["intercept"], "truth.experts.intercept", K)
    if kind != "gaussian":
        var = [noise_sd ** 2] * K  # not a parameter of the regression model; kept so the record has one shape
    elif ("sd" in e) == ("variance" in e):
        raise _err("truth.experts.sd", "give exactly one of sd or variance (one positive number per expert)")
    elif "sd" in e:
        var = [s * s for s in _vector(e["sd"], "truth.experts.sd", K, positive=True)]
    else:
        var = _vector(e["variance"], "truth.experts.variance", K, positive=True)
    reg = dict(expert_kind=kind, degree=degree if kind == "polynomial" else None, noise_sd=noise_sd)
    xd = t.get("x", {"distribution": "uniform", "low": 0.0, "high": 1.0})
    _check_keys(xd, ("distribution", "design", "low", "high", "mean", "sd"), "truth.x")
    if "design" in xd:
        if "distribution" in xd:
            raise _err("truth.x.design", "give either distribution (random x) or design (fixed x), not both")
        _str(xd["design"], "truth.x.design", DESIGNS)
        _check_keys(xd, ("design", "low", "high"), "truth.x")
        lo, hi = _num(xd.get("low", 0.0), "truth.x.low"), _num(xd.get("high", 1.0), "truth.x.high")
        if not hi > lo:
            raise _err("truth.x.high", f"must be > truth.x.low ({lo}), got {hi}")
        if len(gs[0]) != 1:
            raise _err("truth.x.design", f"a linspace design has one feature but the truth has {len(gs[0])} "
                                         "(truth.gate.slope rows); use a distribution for d > 1")
        return TruthSpec(fam, gs, gi, temp, act, es, ei, var, {"design": "linspace", "low": lo, "high": hi}, other, **reg)
    dist = _str(xd.get("distribution", "uniform"), "truth.x.distribution", ("uniform", "normal"))
    if dist == "uniform":
        _check_keys(xd, ("distribution", "low", "high"), "truth.x")
        lo, hi = _num(xd.get("low", 0.0), "truth.x.low"), _num(xd.get("high", 1.0), "truth.x.high")
        if not hi > lo:
            raise _err("truth.x.high", f"must be > truth.x.low ({lo}), got {hi}")
        x = {"distribution": "uniform", "low": lo, "high": hi}
    else:
        _check_keys(xd, ("distribution", "mean", "sd"), "truth.x")
        x = {"distribution": "normal", "mean": _num(xd.get("mean", 0.0), "truth.x.mean"),
             "sd": _num(xd.get("sd", 1.0), "truth.x.sd", positive=True)}
    return TruthSpec(fam, gs, gi, temp, act, es, ei, var, x, other, **reg)


def _experts(e, K, d):
    """[truth.experts] for K true experts and d features: slope, intercept, variance."""
    _check_keys(e, ("slope", "intercept", "sd", "variance"), "truth.experts")
    for k in ("slope", "intercept"):
        if k not in e:
            raise _err(f"truth.experts.{k}", "missing")
    es = _matrix(e["slope"], "truth.experts.slope", K)
    if len(es[0]) != d:
        raise _err("truth.experts.slope", f"rows have {len(es[0])} entries but the gate has {d} features; both need n_features")
    ei = _vector(e["intercept"], "truth.experts.intercept", K)
    if ("sd" in e) == ("variance" in e):
        raise _err("truth.experts.sd", "give exactly one of sd or variance (one positive number per expert)")
    if "sd" in e:
        return es, ei, [v * v for v in _vector(e["sd"], "truth.experts.sd", K, positive=True)]
    return es, ei, _vector(e["variance"], "truth.experts.variance", K, positive=True)


def _gaussian_truth(t: dict, fam: str) -> TruthSpec:
    """[truth] of a gate that models x: proportions π, means c (K, d), covariances Γ (K, d, d); x ~ Σ π N(c, Γ)."""
    g = t["gate"]
    _check_keys(g, ("family", "proportions", "means", "covariances"), "truth.gate")
    for k in ("proportions", "means", "covariances"):
        if k not in g:
            raise _err(f"truth.gate.{k}", f"missing; the {fam!r} gate needs proportions (K,), means (K, d) and covariances (K, d, d)")
    means = _matrix(g["means"], "truth.gate.means")
    K, d = len(means), len(means[0])
    props = _vector(g["proportions"], "truth.gate.proportions", K, positive=True)
    if abs(sum(props) - 1) > 1e-9:
        raise _err("truth.gate.proportions", f"must sum to 1, got {sum(props):g}")
    covs = g["covariances"]
    if not (isinstance(covs, list) and len(covs) == K):
        raise _err("truth.gate.covariances", f"must be a list of {K} d x d matrices (one per true expert), got {covs!r}")
    covs = [_matrix(m, f"truth.gate.covariances[{i}]", d) for i, m in enumerate(covs)]
    if any(len(m[0]) != d for m in covs):
        raise _err("truth.gate.covariances", f"every matrix must be {d} x {d} (d = number of features of the means)")
    import numpy as np

    for i, m in enumerate(covs):
        a = np.asarray(m)
        if not np.allclose(a, a.T) or np.linalg.eigvalsh(a).min() <= 0:
            raise _err(f"truth.gate.covariances[{i}]", "must be symmetric positive definite")
    xd = t.get("x", {"distribution": "gate"})
    if xd != {"distribution": "gate"}:
        raise _err("truth.x", f"the {fam!r} gate is a model of x: x is drawn from it; remove truth.x or write "
                              "x = { distribution = \"gate\" }")
    if "experts" not in t:
        raise _err("truth.experts", "missing; the true model needs [truth.gate] and [truth.experts]")
    es, ei, var = _experts(t["experts"], K, d)
    return TruthSpec(fam, [], [], None, None, es, ei, var, {"distribution": "gate"},
                     gate_params={"proportions": props, "means": means, "covariances": covs})


def _option(o, value, key, n_experts=None):
    """One gate option validated by its registry constraint; StudyError naming ``key`` otherwise."""
    try:
        return o.constraint.check(value, o.name, n_experts)
    except (ValueError, TypeError) as exc:
        raise _err(key, str(exc)) from None


def _theory(t, where: str, loss_name: str) -> Dict[str, Dict[str, Any]]:
    """Validate a [fit.theory] table: quantity → {slope, source} or {rate, source}."""
    from .theory import QUANTITY_NAMES, RATE_CLAIMS

    _check_keys(t, QUANTITY_NAMES, where)
    other = "loss_D2" if loss_name == "D1" else "loss_D1"
    if other in t:
        raise _err(f"{where}.{other}", f"this setting's Voronoi loss is loss_{loss_name}; name the claim loss_{loss_name}")
    out = {}
    for q, c in t.items():
        key = f"{where}.{q}"
        if not isinstance(c, dict):
            raise _err(key, f"must be a table, e.g. {{ slope = -0.5, source = \"paper, theorem\" }}; got {c!r}")
        _check_keys(c, ("slope", "rate", "source"), key)
        if ("slope" in c) == ("rate" in c):
            raise _err(key, f"give exactly one of slope (a number <= 0) or rate ({' | '.join(RATE_CLAIMS)})")
        if "source" not in c:
            raise _err(f"{key}.source", "missing; say where the claim comes from (paper, theorem/section, or \"abstract\")")
        claim = {"source": _str(c["source"], f"{key}.source")}
        if "slope" in c:
            claim["slope"] = _num(c["slope"], f"{key}.slope")
            if claim["slope"] > 0:
                raise _err(f"{key}.slope", f"must be <= 0 (a loss that falls as n^slope), got {claim['slope']}")
        else:
            claim["rate"] = _str(c["rate"], f"{key}.rate", RATE_CLAIMS)
        out[q] = claim
    return out


def _noise(v, key, modes=None) -> Dict[str, Any]:
    """{ sd, n_power[, mode] } of one parameter group of [fit.start]."""
    allowed = ("sd", "n_power") + (("mode",) if modes else ())
    if not isinstance(v, dict):
        raise _err(key, f"must be a table {{ sd = ..., n_power = ... }} (noise sd = sd·n^n_power), got {v!r}")
    _check_keys(v, allowed, key)
    if "sd" not in v:
        raise _err(f"{key}.sd", "missing; the noise sd at n = 1 (sd·n^n_power at sample size n), e.g. sd = 0.05")
    out = {"sd": _num(v["sd"], f"{key}.sd"), "n_power": _num(v.get("n_power", 0.0), f"{key}.n_power")}
    if out["sd"] < 0:
        raise _err(f"{key}.sd", f"must be >= 0, got {v['sd']!r}")
    if modes:
        out["mode"] = _str(v.get("mode", modes[0]), f"{key}.mode", modes)
    return out


def _start(v, where: str, models_x: bool = False) -> Dict[str, Any]:
    """Validate a [fit.start] table into its complete form (see the module docstring)."""
    key = f"{where}.start"
    _check_keys(v, ("assign", "mass", "draw", "gate", "experts", "variance", "temperature", "covariance"), key)
    groups = ("gate", "experts", "variance") + (("covariance",) if models_x else ())
    for g in groups:
        if g not in v:
            raise _err(f"{key}.{g}", "missing; [fit.start] gives every group's noise, e.g. "
                                     f"{g} = {{ sd = 0.05, n_power = -0.083 }} (sd = 0 for none)")
    if "covariance" in v and not models_x:
        raise _err(f"{key}.covariance", "only a gate that models x (family \"gaussian\") has gate covariances")
    out = {
        "assign": _str(v.get("assign", "cover"), f"{key}.assign", START_ASSIGN),
        "mass": _str(v.get("mass", "split"), f"{key}.mass", START_MASS),
        "draw": _str(v.get("draw", "independent"), f"{key}.draw", START_DRAW),
        "gate": _noise(v["gate"], f"{key}.gate"),
        "experts": _noise(v["experts"], f"{key}.experts"),
        "variance": _noise(v["variance"], f"{key}.variance", VARIANCE_MODES),
        "temperature": _noise(v.get("temperature", {"sd": 0.0}), f"{key}.temperature"),
    }
    if models_x:
        out["covariance"] = _noise(v["covariance"], f"{key}.covariance", ("additive-abs",))
    return out


def _fit(f: dict, i: int, truth: TruthSpec) -> FitSpec:
    where = f"fit[{i}]"
    allowed = ("name", "n_experts", "gate", "gate_options", "estimator", "init", "n_init", "perturbation", "loss",
               "max_iter", "tol", "convergence", "n", "tries", "start", "theory", "routing_start", "accelerate")
    _check_keys(f, allowed, where)
    if "n_experts" not in f:
        raise _err(f"{where}.n_experts", "missing; how many experts does the fitted model have?")
    K = _int(f["n_experts"], f"{where}.n_experts", 1)
    gate = _str(f.get("gate", truth.gate), f"{where}.gate", _families())
    if gate != truth.gate:
        raise _err(f"{where}.gate", f"is {gate!r} but the truth's gate family is {truth.gate!r}; Voronoi losses compare parameters of the same family")
    from ..gates import gate_family

    declared = {o.name: o for o in gate_family(gate).options}
    opts = f.get("gate_options", {})
    _check_keys(opts, tuple(declared), f"{where}.gate_options")
    opts = dict(opts)
    if "temperature" in opts:
        opts["temperature"] = _num(opts["temperature"], f"{where}.gate_options.temperature", positive=True)
    if "learn_temperature" in opts and not isinstance(opts["learn_temperature"], bool):
        raise _err(f"{where}.gate_options.learn_temperature", f"must be true or false, got {opts['learn_temperature']!r}")
    for name, o in declared.items():
        if o.required and name not in opts and name in truth.gate_options:  # e.g. top_k: the truth's
            opts[name] = truth.gate_options[name]
        if name in opts and name != "activation":
            opts[name] = _option(o, opts[name], f"{where}.gate_options.{name}", K)
    if gate == "activation":
        act = _str(opts.get("activation", truth.activation), f"{where}.gate_options.activation", _activation_names())
        if act != truth.activation:
            raise _err(f"{where}.gate_options.activation", f"is {act!r} but the truth uses {truth.activation!r}")
        opts["activation"] = act
    init = _str(f.get("init", "truth-perturbed"), f"{where}.init", INITS)
    if init == "truth-perturbed" and K < truth.n_experts:
        raise _err(f"{where}.init", f"truth-perturbed needs n_experts >= the truth's {truth.n_experts}; use kmeans for under-specified fits")
    spec = FitSpec(
        name=_str(f.get("name", f"K{K}-{gate}"), f"{where}.name"),
        n_experts=K,
        gate=gate,
        gate_options=opts,
        estimator=_str(f.get("estimator", "em"), f"{where}.estimator", ESTIMATORS),
        init=init,
        n_init=_int(f.get("n_init", 1), f"{where}.n_init", 1),
        perturbation=_num(f.get("perturbation", 0.1), f"{where}.perturbation"),
        loss=_str(f.get("loss", "auto"), f"{where}.loss", LOSSES),
        max_iter=_int(f.get("max_iter", 500), f"{where}.max_iter", 1),
        tol=_num(f.get("tol", 1e-8), f"{where}.tol", positive=True),
        convergence=_str(f.get("convergence", "mean"), f"{where}.convergence", CONVERGENCE),
        n=_n_grid(f["n"], f"{where}.n") if "n" in f else None,
        tries=_int(f.get("tries", 1), f"{where}.tries", 1),
        accelerate=_str(f.get("accelerate", "off"), f"{where}.accelerate", ACCELERATE),
    )
    if spec.perturbation < 0:
        raise _err(f"{where}.perturbation", f"must be >= 0, got {spec.perturbation}")
    if "start" in f:
        if init != "truth-perturbed":
            raise _err(f"{where}.start", f"only init = \"truth-perturbed\" takes a start table (init is {init!r})")
        if "perturbation" in f:
            raise _err(f"{where}.start", "give either perturbation (moelab's start: N(0, p²) noise everywhere) or a "
                                         "[fit.start] table, not both")
        spec.start = _start(f["start"], where, gate_family(gate).models_x)
        spec.perturbation = None
    if (spec.estimator == "lse") != truth.regression:
        raise _err(f"{where}.estimator", "least squares (estimator = \"lse\") fits regression truths (truth.experts.kind "
                                         "other than gaussian) and only those; "
                   + ("use estimator = \"lse\"" if truth.regression else "use em or mle"))
    if spec.estimator == "lse" and spec.start is not None:
        raise _err(f"{where}.start", "estimator = \"lse\" takes moelab's truth-perturbed start (perturbation), not a start table")
    if spec.estimator != "em":
        if spec.accelerate != "off":
            raise _err(f"{where}.accelerate", f"accelerates EM; estimator {spec.estimator!r} has no EM iterations: "
                                              "remove accelerate or use estimator = \"em\"")
        if spec.convergence != "mean":
            raise _err(f"{where}.convergence", f"is an EM stopping rule; estimator {spec.estimator!r} uses tol on "
                                               "its own objective: remove convergence or use estimator = \"em\"")
        if spec.tries > 1 and spec.estimator != "lse":
            raise _err(f"{where}.tries", f"needs estimator = \"em\" or \"lse\" (got {spec.estimator!r}); use tries = 1")
    if "routing_start" in f:
        key = f"{where}.routing_start"
        spec.routing_start = _str(f["routing_start"], key, ROUTING_STARTS)
        if not gate_family(gate).sparse_routing:
            raise _err(key, f"only gates that route each input to some experts (topk) have a routing start; "
                            f"the {gate!r} gate weights every expert: remove routing_start")
        if init != "truth-perturbed" or spec.estimator != "em":
            raise _err(key, "applies to init = \"truth-perturbed\" with estimator = \"em\" (other inits fit the dense "
                            "model first anyway); remove routing_start")
    if spec.tries > 1 and init != "truth-perturbed":
        raise _err(f"{where}.tries", f"counts truth-perturbed starts; for init = {init!r} use n_init (starts per replicate)")
    spec.theory = _theory(f.get("theory", {}), f"{where}.theory", spec.loss_name(truth.n_experts))
    return spec


def parse_study(data: dict, *, quick: bool = False) -> Study:
    """Validate a parsed study TOML (a dict) and build a :class:`Study`.

    Parameters
    ----------
    data : dict
        The TOML document.
    quick : bool, default False
        Apply the ``[quick]`` overrides (n grids, replicates, max_iter, tol,
        per-setting n and tries).

    Raises
    ------
    StudyError
        Unknown keys, wrong types, a truth with the wrong number of
        parameters, non-positive variances or temperature, an empty or
        malformed n grid (linspace tables included), duplicate fit names,
        ``quick`` without a ``[quick]`` table; a fixed design with d > 1;
        ``[fit.start]`` together with ``perturbation`` or with another init,
        a start table missing a group or with a negative sd or unknown rule;
        ``tries`` > 1 or ``convergence`` with an estimator or init that has
        no such notion; ``[quick.fit.NAME]`` naming no setting.
    """
    _check_keys(data, ("study", "truth", "fit", "quick"), "<top level>")
    for k in ("study", "truth", "fit"):
        if k not in data:
            raise _err(k, f"missing; a study needs [study], [truth] and at least one [[fit]] table")
    s = data["study"]
    _check_keys(s, ("name", "seed", "replicates", "n", "batch_size", "x_points"), "study")
    truth = _truth(data["truth"])
    fits_raw = data["fit"]
    if not isinstance(fits_raw, list) or not fits_raw:
        raise _err("fit", "must be one or more [[fit]] tables")
    fits = [_fit(f, i, truth) for i, f in enumerate(fits_raw)]
    names = [f.name for f in fits]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err("fit.name", f"duplicate setting name(s) {dup}; give every [[fit]] a unique name")
    if "n" not in s and any(f.n is None for f in fits):
        raise _err("study.n", "missing; give the sample sizes, e.g. n = [100, 1000, 10000] (or an n in every [[fit]])")
    study = Study(
        name=_str(s.get("name", "study"), "study.name"),
        seed=_int(s.get("seed", 0), "study.seed", 0),
        replicates=_int(s.get("replicates", 10), "study.replicates", 1),
        n=_n_grid(s["n"], "study.n") if "n" in s else [],
        truth=truth,
        fits=fits,
        batch_size=_int(s.get("batch_size", 0), "study.batch_size", 0),
        x_points=_int(s.get("x_points", 64), "study.x_points", 1),
    )
    if quick and data.get("quick") is None:
        raise _err("quick", "this study has no [quick] table; run without --quick or add one")
    if "quick" in data:  # validated whether or not --quick is given
        _quick(data["quick"], study, apply=quick)
    for f in study.fits:
        key = "study.n" if f.n is None else f"fit[{names.index(f.name)}].n"
        from ..gates import gate_spec

        options = {**truth.gate_options, **f.gate_options}
        n_params = gate_spec(f.gate, options, n_experts=f.n_experts).n_free_parameters(f.n_experts, truth.n_features) \
            + f.n_experts * ((truth.degree or 1) * truth.n_features + (1 if truth.regression else 2))
        if min(study.grid(f)) < n_params:
            raise _err(key, f"n = {min(study.grid(f))} is fewer than the {n_params} free parameters of setting "
                            f"{f.name!r}; raise the smallest n")
    return study


def _quick(q, study: Study, apply: bool) -> None:
    """Validate the [quick] table and, if ``apply``, apply it to ``study`` in place.

    Precedence of a setting's n under --quick: quick.fit.NAME.n, then quick.n
    (which replaces [study].n and every setting's own n), then the setting's own n.
    """
    _check_keys(q, ("n", "replicates", "max_iter", "tol", "fit"), "quick")
    n = _n_grid(q["n"], "quick.n") if "n" in q else None
    reps = _int(q["replicates"], "quick.replicates", 1) if "replicates" in q else None
    max_iter = _int(q["max_iter"], "quick.max_iter", 1) if "max_iter" in q else None
    tol = _num(q["tol"], "quick.tol", positive=True) if "tol" in q else None
    per_fit = q.get("fit", {})
    if not isinstance(per_fit, dict):
        raise _err("quick.fit", f"must be a table of settings by name, e.g. fit = {{ exact = {{ n = [100, 1000] }} }}; got {per_fit!r}")
    names = [f.name for f in study.fits]
    overrides = {}
    for name, t in per_fit.items():
        key = f"quick.fit.{name}"
        if name not in names:
            raise _err(key, f"no [[fit]] is named {name!r}; the settings are {names}")
        _check_keys(t, ("n", "tries"), key)
        overrides[name] = {k: (_n_grid(v, f"{key}.n") if k == "n" else _int(v, f"{key}.tries", 1)) for k, v in t.items()}
        if overrides[name].get("tries", 1) > 1 and study.fits[names.index(name)].init != "truth-perturbed":
            raise _err(f"{key}.tries", "counts truth-perturbed starts; this setting has init = "
                                       f"{study.fits[names.index(name)].init!r} (use tries = 1)")
    if not apply:
        return
    if n is not None:
        study.n = n
    if reps is not None:
        study.replicates = reps
    for f in study.fits:
        if n is not None:
            f.n = None
        if max_iter is not None:
            f.max_iter = min(f.max_iter, max_iter)
        if tol is not None:
            f.tol = max(f.tol, tol)
        o = overrides.get(f.name, {})
        if "n" in o:
            f.n = o["n"]
        if "tries" in o:
            f.tries = o["tries"]


def load_study(path, *, quick: bool = False) -> Study:
    """Read and validate a study TOML file (see the module docstring for the schema).

    Raises
    ------
    StudyError
        Invalid TOML, an invalid study (message names the key and the fix), or a
        path that is missing, a directory or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise StudyError(f"no such study file {str(path)!r}; give the path of a study TOML file "
                         "(presets: moelab/presets/, or use `moelab reproduce NAME`)")
    if path.is_dir():
        raise StudyError(f"{str(path)!r} is a directory; give the path of a study TOML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"could not read study file {str(path)!r}: {exc}; check the file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML ({exc})") from None
    return parse_study(data, quick=quick)
