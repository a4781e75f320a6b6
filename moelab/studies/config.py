"""The study file: a TOML description of a rate study, validated before any fitting.

Schema (every key listed; anything else is rejected)::

    [study]
    name = "softmax-2023"          # str
    seed = 0                       # int
    replicates = 40                # int >= 1
    n = [100, 1000, 10000]         # list of ints >= 2, or
    # n = { min = 100, max = 100000, num = 10 }   (log-spaced, rounded)
    batch_size = 0                 # replicates fitted per call (0: all)
    x_points = 64                  # points representing the x distribution in density distances

    [truth]
    x = { distribution = "uniform", low = 0.0, high = 1.0 }   # or "normal", mean, sd
    [truth.gate]
    family = "softmax"             # softmax | temperature | activation
    slope = [[25.0], [0.0]]        # (K*, d); last row = reference expert
    intercept = [-8.0, 0.0]        # (K*,)
    temperature = 1.0              # temperature/activation only, > 0
    activation = "tanh"            # activation only
    [truth.experts]
    slope = [[-20.0], [20.0]]      # (K*, d)
    intercept = [15.0, -5.0]       # (K*,)
    sd = [0.3, 0.4]                # or variance = [...]; > 0

    [[fit]]                        # one table per fitted-model setting
    name = "exact"                 # unique
    n_experts = 2
    gate = "softmax"               # default: the true family
    gate_options = {}              # e.g. { learn_temperature = true, activation = "tanh" }
    estimator = "em"               # em | mle
    init = "truth-perturbed"       # truth-perturbed | kmeans | random | segments | lines | auto
    n_init = 1
    perturbation = 0.1             # truth-perturbed: sd of the additive noise (relative for ν)
    loss = "auto"                  # auto (D1 if n_experts == K*, else D2) | D1 | D2
    max_iter = 500
    tol = 1e-8
    [fit.theory]                   # optional: the theory's rate per rates.csv quantity (moelab.studies.theory)
    loss_D1 = { slope = -0.5, source = "NeurIPS 2023, exact-specified" }   # slope <= 0, or
    err_temperature = { rate = "slower-than-polynomial", source = "ICML 2024, abstract" }  # or "polynomial"

    [quick]                        # optional overrides for --quick
    n = [100, 1000]
    replicates = 4
    max_iter = 200
    tol = 1e-6

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

GATE_FAMILIES = ("softmax", "temperature", "activation")
INITS = ("truth-perturbed", "kmeans", "random", "segments", "lines", "auto")
ESTIMATORS = ("em", "mle")
LOSSES = ("auto", "D1", "D2")
ACTIVATIONS = ("tanh", "sigmoid", "gelu", "softplus", "relu", "identity")


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

    @property
    def n_experts(self) -> int:
        return len(self.gate_intercept)

    @property
    def n_features(self) -> int:
        return len(self.gate_slope[0])


@dataclass
class FitSpec:
    name: str
    n_experts: int
    gate: str
    gate_options: Dict[str, Any] = field(default_factory=dict)
    estimator: str = "em"
    init: str = "truth-perturbed"
    n_init: int = 1
    perturbation: float = 0.1
    loss: str = "auto"
    max_iter: int = 500
    tol: float = 1e-8
    theory: Dict[str, Dict[str, Any]] = field(default_factory=dict)

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

    def to_dict(self) -> dict:
        return asdict(self)

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


def _n_grid(v, key) -> List[int]:
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
        grid = sorted({_int(e, f"{key}[{i}]", 2) for i, e in enumerate(v)})
    else:
        raise _err(key, f"must be a list of integers or a table {{min, max, num}}, got {v!r}")
    return grid


def _truth(t: dict) -> TruthSpec:
    _check_keys(t, ("x", "gate", "experts"), "truth")
    for k in ("gate", "experts"):
        if k not in t:
            raise _err(f"truth.{k}", "missing; the true model needs [truth.gate] and [truth.experts]")
    g = t["gate"]
    _check_keys(g, ("family", "slope", "intercept", "temperature", "activation"), "truth.gate")
    fam = _str(g.get("family", "softmax"), "truth.gate.family", GATE_FAMILIES)
    for k in ("slope", "intercept"):
        if k not in g:
            raise _err(f"truth.gate.{k}", "missing")
    gs = _matrix(g["slope"], "truth.gate.slope")
    K = len(gs)
    gi = _vector(g["intercept"], "truth.gate.intercept", K)
    if any(v != 0 for v in gs[-1]) and fam == "activation":
        raise _err("truth.gate.slope", "the last (reference) expert's slope must be 0 for activation gates (σ(0) is the reference)")
    temp = None
    if "temperature" in g:
        if fam == "softmax":
            raise _err("truth.gate.temperature", "the softmax gate has no temperature; use family = \"temperature\" or remove the key")
        temp = _num(g["temperature"], "truth.gate.temperature", positive=True)
    elif fam != "softmax":
        temp = 1.0
    act = None
    if "activation" in g:
        if fam != "activation":
            raise _err("truth.gate.activation", f"only family = \"activation\" takes an activation (family is {fam!r})")
        act = _str(g["activation"], "truth.gate.activation", ACTIVATIONS)
    elif fam == "activation":
        raise _err("truth.gate.activation", f"missing; choose one of {list(ACTIVATIONS)}")
    e = t["experts"]
    _check_keys(e, ("slope", "intercept", "sd", "variance"), "truth.experts")
    for k in ("slope", "intercept"):
        if k not in e:
            raise _err(f"truth.experts.{k}", "missing")
    es = _matrix(e["slope"], "truth.experts.slope", K)
    if len(es[0]) != len(gs[0]):
        raise _err("truth.experts.slope", f"rows have {len(es[0])} entries but truth.gate.slope rows have {len(gs[0])}; both need n_features")
    ei = _vector(e["intercept"], "truth.experts.intercept", K)
    if ("sd" in e) == ("variance" in e):
        raise _err("truth.experts.sd", "give exactly one of sd or variance (one positive number per expert)")
    if "sd" in e:
        var = [s * s for s in _vector(e["sd"], "truth.experts.sd", K, positive=True)]
    else:
        var = _vector(e["variance"], "truth.experts.variance", K, positive=True)
    xd = t.get("x", {"distribution": "uniform", "low": 0.0, "high": 1.0})
    _check_keys(xd, ("distribution", "low", "high", "mean", "sd"), "truth.x")
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
    return TruthSpec(fam, gs, gi, temp, act, es, ei, var, x)


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


def _fit(f: dict, i: int, truth: TruthSpec) -> FitSpec:
    where = f"fit[{i}]"
    allowed = ("name", "n_experts", "gate", "gate_options", "estimator", "init", "n_init", "perturbation", "loss", "max_iter",
               "tol", "theory")
    _check_keys(f, allowed, where)
    if "n_experts" not in f:
        raise _err(f"{where}.n_experts", "missing; how many experts does the fitted model have?")
    K = _int(f["n_experts"], f"{where}.n_experts", 1)
    gate = _str(f.get("gate", truth.gate), f"{where}.gate", GATE_FAMILIES)
    if gate != truth.gate:
        raise _err(f"{where}.gate", f"is {gate!r} but the truth's gate family is {truth.gate!r}; Voronoi losses compare parameters of the same family")
    opts = f.get("gate_options", {})
    allowed_opts = {"softmax": (), "temperature": ("temperature", "learn_temperature"), "activation": ("temperature", "learn_temperature", "activation")}[gate]
    _check_keys(opts, allowed_opts, f"{where}.gate_options")
    opts = dict(opts)
    if "temperature" in opts:
        opts["temperature"] = _num(opts["temperature"], f"{where}.gate_options.temperature", positive=True)
    if "learn_temperature" in opts and not isinstance(opts["learn_temperature"], bool):
        raise _err(f"{where}.gate_options.learn_temperature", f"must be true or false, got {opts['learn_temperature']!r}")
    if gate == "activation":
        act = _str(opts.get("activation", truth.activation), f"{where}.gate_options.activation", ACTIVATIONS)
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
    )
    if spec.perturbation < 0:
        raise _err(f"{where}.perturbation", f"must be >= 0, got {spec.perturbation}")
    spec.theory = _theory(f.get("theory", {}), f"{where}.theory", spec.loss_name(truth.n_experts))
    return spec


def parse_study(data: dict, *, quick: bool = False) -> Study:
    """Validate a parsed study TOML (a dict) and build a :class:`Study`.

    Parameters
    ----------
    data : dict
        The TOML document.
    quick : bool, default False
        Apply the ``[quick]`` overrides (n grid, replicates, max_iter, tol).

    Raises
    ------
    StudyError
        Unknown keys, wrong types, a truth with the wrong number of
        parameters, non-positive variances or temperature, an empty n grid,
        duplicate fit names, ``quick`` without a ``[quick]`` table.
    """
    _check_keys(data, ("study", "truth", "fit", "quick"), "<top level>")
    for k in ("study", "truth", "fit"):
        if k not in data:
            raise _err(k, f"missing; a study needs [study], [truth] and at least one [[fit]] table")
    s = data["study"]
    _check_keys(s, ("name", "seed", "replicates", "n", "batch_size", "x_points"), "study")
    if "n" not in s:
        raise _err("study.n", "missing; give the sample sizes, e.g. n = [100, 1000, 10000]")
    truth = _truth(data["truth"])
    fits_raw = data["fit"]
    if not isinstance(fits_raw, list) or not fits_raw:
        raise _err("fit", "must be one or more [[fit]] tables")
    fits = [_fit(f, i, truth) for i, f in enumerate(fits_raw)]
    names = [f.name for f in fits]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err("fit.name", f"duplicate setting name(s) {dup}; give every [[fit]] a unique name")
    study = Study(
        name=_str(s.get("name", "study"), "study.name"),
        seed=_int(s.get("seed", 0), "study.seed", 0),
        replicates=_int(s.get("replicates", 10), "study.replicates", 1),
        n=_n_grid(s["n"], "study.n"),
        truth=truth,
        fits=fits,
        batch_size=_int(s.get("batch_size", 0), "study.batch_size", 0),
        x_points=_int(s.get("x_points", 64), "study.x_points", 1),
    )
    if quick:
        q = data.get("quick")
        if q is None:
            raise _err("quick", "this study has no [quick] table; run without --quick or add one")
        _check_keys(q, ("n", "replicates", "max_iter", "tol"), "quick")
        if "n" in q:
            study.n = _n_grid(q["n"], "quick.n")
        if "replicates" in q:
            study.replicates = _int(q["replicates"], "quick.replicates", 1)
        for f in study.fits:
            if "max_iter" in q:
                f.max_iter = min(f.max_iter, _int(q["max_iter"], "quick.max_iter", 1))
            if "tol" in q:
                f.tol = max(f.tol, _num(q["tol"], "quick.tol", positive=True))
    elif "quick" in data:
        q = data["quick"]
        _check_keys(q, ("n", "replicates", "max_iter", "tol"), "quick")
    for n in study.n:
        for f in study.fits:
            n_params = (f.n_experts - 1) * (truth.n_features + 1) + f.n_experts * (truth.n_features + 2)
            if n < n_params:
                raise _err("study.n", f"n = {n} is fewer than the {n_params} free parameters of setting {f.name!r}; raise the smallest n")
    return study


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
