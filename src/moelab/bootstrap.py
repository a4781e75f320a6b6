"""Bootstrap confidence intervals for a fitted mixture of experts: B refits in one batched EM call.

Nonparametric (case resampling: draw n rows (x_n, y_n) with replacement) or
parametric (keep x, draw y* ~ p̂(y | x) from the fit). All B resamples are fitted
by ONE :func:`moelab.fit_em` call with batch shape (B,), every replicate
started from the fit itself (so no restarts are needed and the labels start
aligned). Efron & Tibshirani (1993), ch. 6 and 13 (percentile intervals);
the same scheme as flexmix's ``boot()`` (Grün & Leisch 2004).

Labels: a replicate's experts are matched to the fit's by the assignment that
minimises the distance between expert parameters (standardised: intercept at
the mean of x and slopes in units of sd(y)/sd(x), log σ), solved by
``scipy.optimize.linear_sum_assignment``; the gate rows are permuted with them
and re-referenced to the last expert (valid for gates whose logits are linear
in the gate parameters; for other gates the reference expert keeps its label).
Replicates whose fit collapsed an expert, or whose log-likelihood is not
finite, are left out of the intervals (``valid``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .em import fit_em
from .fitcore import prepare_xy
from .inference import ParameterLayout
from .model import GaussianMoE

__all__ = ["BootstrapResult", "bootstrap_fit", "BOOTSTRAP_KINDS"]

BOOTSTRAP_KINDS = ("nonparametric", "parametric")


@dataclass
class BootstrapResult:
    """What :func:`bootstrap_fit` returns.

    Attributes
    ----------
    layout : ParameterLayout
        Parameter names and order (as :func:`moelab.inference.wald_inference`).
    estimate : ndarray of shape (p,)
        The fit the resamples started from.
    draws : ndarray of shape (n_boot, p)
        Refitted parameters, labels aligned to the fit.
    valid : ndarray of shape (n_boot,), bool
        Replicates used for the intervals (no collapsed expert, finite log-likelihood).
    converged : ndarray of shape (n_boot,), bool
    relabelled : int
        Replicates whose experts were permuted to match the fit.
    kind : str
    n_boot : int
    seed : int
    seconds : float
        Wall time of the resampling and the one batched fit.
    """

    layout: ParameterLayout
    estimate: np.ndarray
    draws: np.ndarray
    valid: np.ndarray
    converged: np.ndarray
    relabelled: int
    kind: str
    n_boot: int
    seed: int
    seconds: float

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def se(self) -> np.ndarray:
        """Bootstrap standard errors (sd of the valid draws, ddof=1): shape (p,); NaN with < 2 valid draws."""
        d = self.draws[self.valid]
        return d.std(0, ddof=1) if d.shape[0] >= 2 else np.full(self.layout.p, np.nan)

    def percentile_interval(self, level: float = 0.95):
        """(lower, upper) percentile interval at ``level`` (each of shape (p,)).

        Raises
        ------
        ValueError
            ``level`` not in (0, 1), or no valid replicate.
        """
        if not (isinstance(level, (int, float)) and 0 < level < 1):
            raise ValueError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
        d = self.draws[self.valid]
        if d.shape[0] == 0:
            raise ValueError("no bootstrap replicate gave a valid fit; use more data or fewer experts")
        a = (1 - level) / 2
        return np.quantile(d, a, axis=0), np.quantile(d, 1 - a, axis=0)

    def confint(self, level: float = 0.95):
        """Percentile intervals as a DataFrame: ``parameter``, ``estimate``, ``se`` (bootstrap), ``lower``, ``upper``."""
        import pandas as pd

        lo, hi = self.percentile_interval(level)
        return pd.DataFrame({"parameter": self.layout.names, "estimate": self.estimate, "se": self.se(),
                             "lower": lo, "upper": hi})

    def as_params(self, level: float = 0.95) -> dict:
        """``se``, ``lower``, ``upper`` each in the structure of the fit's ``params`` (None where undefined)."""
        lo, hi = self.percentile_interval(level)
        lay = self.layout
        # the variance's percentile bounds are the sd's squared (σ ↦ σ² is increasing on σ > 0)
        return {"se": lay.structured(self.se(), sd_estimate=self.estimate), "lower": lay.structured(lo),
                "upper": lay.structured(hi)}


def _align(model: GaussianMoE, ref: GaussianMoE, x, y) -> tuple:
    """Permute each replicate's experts (batch (B,)) to match ``ref`` (batch ()); re-reference the gate."""
    from scipy.optimize import linear_sum_assignment

    B, K = model.batch_shape[0], model.n_experts
    xm = x.mean(-2)  # (d,)
    xs = x.std(-2).clamp_min(1e-300)
    e, r = model.experts, ref.experts
    scale_y = float(y.std())

    def feats(ex, bshape):
        at_mean = ex.intercept + (ex.slope * xm).sum(-1)
        return torch.cat([(at_mean / scale_y).unsqueeze(-1), ex.slope * xs / scale_y, 0.5 * ex.variance.log().unsqueeze(-1)], -1)

    fr, fb = feats(r, ()), feats(e, (B,))
    cost = torch.cdist(fb, fr.expand(B, *fr.shape)).square().cpu().numpy()  # (B, K, K): replicate k vs fit j
    linear = model.gate.linear_logits
    if not linear:
        cost[:, K - 1, :] = np.inf
        cost[:, :, K - 1] = np.inf
        cost[:, K - 1, K - 1] = 0.0
    perm = np.empty((B, K), dtype=np.int64)
    for b in range(B):
        c = np.nan_to_num(cost[b], nan=1e300, posinf=1e300)
        rows, cols = linear_sum_assignment(c)
        perm[b, cols] = rows  # fit expert j ↔ replicate expert perm[b, j]
    moved = int((perm != np.arange(K)).any(-1).sum())
    if not moved:
        return model, 0
    idx = torch.as_tensor(perm, device=e.slope.device)
    take = lambda t: torch.take_along_dim(t, idx.view(B, K, *([1] * (t.dim() - 2))), 1)  # noqa: E731
    gate = model.gate
    slope, intercept = take(gate.slope), take(gate.intercept)
    slope, intercept = slope - slope[:, -1:], intercept - intercept[:, -1:]
    experts = e.map_tensors(take)
    return GaussianMoE(gate.replace(slope=slope, intercept=intercept), experts), moved


def bootstrap_fit(model: GaussianMoE, x, y, n_boot: int, *, kind: str = "nonparametric", gate_options: Optional[dict] = None,
              random_state=None, max_iter: int = 2000, tol: float = 1e-8, feature_names: Optional[Sequence[str]] = None,
              compile="auto", accelerate="squarem") -> BootstrapResult:
    """Refit ``n_boot`` bootstrap resamples of (x, y) in one batched :func:`moelab.fit_em` call from ``model``.

    Parameters
    ----------
    model : GaussianMoE
        The fit (batch shape ()), original units.
    x : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
        The data it was fitted on.
    n_boot : int
        Number of resamples B ≥ 2 (a few hundred for standard errors, 1000+ for 95% percentile intervals).
    kind : {"nonparametric", "parametric"}, default "nonparametric"
        Resample rows (x_n, y_n) with replacement, or keep x and draw y* from the fitted model.
    gate_options : dict, optional
        The gate's options as given to the fit (default: read from the gate: its temperature, whether it
        is estimated, the activation, top_k).
    random_state : int or None
        Seeds the resampling (and nothing else: each refit starts from ``model``); the same int gives
        the same result.
    max_iter, tol
        EM settings of the refits (as :func:`moelab.fit_em`).
    feature_names : sequence of str, optional
        For the parameter names.
    compile : {"auto", True, False}
        As :func:`moelab.fit_em`.
    accelerate : {"squarem", None}
        As :func:`moelab.fit_em` (the fit's own setting, so the refits run the same EM).

    Returns
    -------
    BootstrapResult
        ``confint(level)`` (percentile), ``se()``, ``draws`` (n_boot, p).

    Raises
    ------
    ValueError
        n_boot < 2, unknown kind, a model with batch dimensions, or data not matching the model.
    """
    t0 = time.perf_counter()
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2 (bootstrap resamples), got {n_boot!r}")
    if kind not in BOOTSTRAP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(BOOTSTRAP_KINDS)}, got {kind!r}")
    if not isinstance(model, GaussianMoE) or model.batch_shape != ():
        raise ValueError("model must be one fitted GaussianMoE (batch shape ()); bootstrap one problem at a time")
    xt, yt, batch = prepare_xy(x, y, dtype=model.dtype)
    if batch != () or xt.shape[-1] != model.n_features:
        raise ValueError(f"x must have shape (n_samples, {model.n_features}) and y (n_samples,) for this model")
    xt, yt = xt[0], yt[0]
    n = yt.shape[0]
    seed = int(random_state) if random_state is not None else int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    B = int(n_boot)
    if kind == "nonparametric":
        idx = torch.as_tensor(np.random.default_rng(seed).integers(0, n, size=(B, n)), device=xt.device)
        xb, yb = xt[idx], yt[idx]
    else:
        xb = xt.expand(B, *xt.shape)
        # drawn on the CPU from a seeded CPU generator (the same draws on every device), then moved
        yb = model.to(device="cpu").sample(xb.cpu(), torch.Generator().manual_seed(seed)).to(xt.device)
    gate = model.gate
    if gate_options is None:
        from .gates import gate_family

        gate_options = {}
        for o in gate_family(gate.name).options:
            v = getattr(gate, o.name, None)
            if isinstance(v, torch.Tensor):
                v = float(v.flatten()[0])
            if v is not None:
                gate_options[o.name] = v
    res = fit_em(xb, yb, model.n_experts, gate=gate.name, gate_options=gate_options, init_model=model,
                 max_iter=max_iter, tol=tol, random_state=seed, warn=False, compile=compile, accelerate=accelerate)
    fitted, moved = _align(res.model, model, xt, yt)
    layout = ParameterLayout.of(model, feature_names)
    draws = layout.vector(fitted).detach().cpu().numpy()
    ref = GaussianMoE(model.gate.map_tensors(lambda t: t[None]), model.experts.map_tensors(lambda t: t[None]))
    estimate = layout.vector(ref).detach().cpu().numpy()[0]
    valid = (~res.degenerate & torch.isfinite(res.loglik)).cpu().numpy() & np.isfinite(draws).all(-1)
    return BootstrapResult(layout=layout, estimate=estimate, draws=draws, valid=valid,
                           converged=res.converged.cpu().numpy(), relabelled=moved, kind=kind, n_boot=B, seed=seed,
                           seconds=time.perf_counter() - t0)
