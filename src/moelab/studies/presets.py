"""Named preset studies shipped with moelab (``moelab reproduce NAME``).

A preset is one or more study files in ``moelab/presets/`` (a study has one
true model, so a comparison of gates is one study per gate):

===================  ===========================================================
name                 study files
===================  ===========================================================
softmax-2023         ``softmax-2023.toml`` — Nguyen, Nguyen & Ho (NeurIPS 2023):
                     softmax Gaussian MoE, exact (K=2) and over-specified
                     (K=3, 4) fits, losses D1/D2 and density distances, in
                     moelab's simplified design (x ~ U(0, 1), 10 log-spaced n,
                     N(0, 0.1²) start noise, one start).
softmax-2023-paper   ``softmax-2023-paper.toml`` — the same study in the
                     authors' design (their code, CRPE-SGaME): fixed
                     x = linspace(0, 1, n), 200 linearly spaced n per setting
                     (K=2 from 100, K=3/4 from 10⁴, to 10⁵), near-truth
                     starts with n-dependent noise, best of 5 tries for K=3/4,
                     EM stopped at a relative log-likelihood change of 1e-6.
temperature-2024     ``temperature-2024-{temperature,tanh,sigmoid,identity}.toml``
                     — Nguyen, Akbarian & Ho (ICML 2024): estimated temperature
                     (a), activation gates tanh and sigmoid (b), identity
                     control (c); K=2 and K=3 each.
sigmoid-2024         ``sigmoid-2024-{sigmoid,softmax}-{linear,relu,gelu}.toml`` —
                     Nguyen, Ho & Rinaldo (NeurIPS 2024; arXiv 2402.02952):
                     least-squares regression MoE, sigmoid vs softmax gating on
                     the same data, linear, ReLU and GELU experts, exact (K=2)
                     and over-specified (K=3) fits; moelab's design. Writes
                     ``gate-comparison.csv`` and ``gate-comparison.png``.
gaussian-gate-2024   ``gaussian-gate-2024-type{I,II}-d{1,2}.toml`` — Nguyen,
                     Nguyen, Nguyen & Ho (AISTATS 2024) in the authors' design
                     (CRPE-GMoE): Gaussian-gated MoE, K* = 3 fitted with K = 4, 5
                     (and one EM step at K = 5, what their code runs), Type I
                     (every c* ≠ 0) and II (c*_1 = 0), d = 1 and 2, the losses D̄/D̃.
topk-2024            ``topk-2024.toml`` — Nguyen, Akbarian, Yan & Ho (ICLR 2024):
                     top-1 truth (the softmax-2023 experts and logits), exact
                     (K=2, top-1) and over-specified (K=3, top-2; and top-1 as a
                     contrast) fits from dense-fitted truth-perturbed starts,
                     routing-mass losses D1/D2 and density distances; moelab's design.
===================  ===========================================================
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List, Tuple

import pandas as pd

from .config import Study, StudyError, load_study

__all__ = ["PRESETS", "preset_paths", "load_preset", "preset_runs", "reproduce"]

PRESETS = {
    "softmax-2023": ("softmax-2023.toml",),
    "softmax-2023-paper": ("softmax-2023-paper.toml",),
    "sigmoid-2024": tuple(f"sigmoid-2024-{g}-{e}.toml" for e in ("linear", "relu", "gelu") for g in ("sigmoid", "softmax")),
    "gaussian-gate-2024": (
        "gaussian-gate-2024-typeI-d1.toml",
        "gaussian-gate-2024-typeII-d1.toml",
        "gaussian-gate-2024-typeI-d2.toml",
        "gaussian-gate-2024-typeII-d2.toml",
    ),
    "topk-2024": ("topk-2024.toml",),
    "temperature-2024": (
        "temperature-2024-temperature.toml",
        "temperature-2024-tanh.toml",
        "temperature-2024-sigmoid.toml",
        "temperature-2024-identity.toml",
    ),
}


def preset_paths(name: str) -> List[Path]:
    """Paths of the TOML files of preset ``name``.

    Raises
    ------
    StudyError
        Unknown preset name.
    """
    if name not in PRESETS:
        raise StudyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    root = resources.files("moelab") / "presets"
    return [Path(str(root / f)) for f in PRESETS[name]]


def load_preset(name: str, *, quick: bool = False) -> List[Study]:
    """The validated studies of preset ``name`` (with their ``[quick]`` overrides if ``quick``)."""
    return [load_study(p, quick=quick) for p in preset_paths(name)]


def preset_runs(name: str, out, *, quick: bool = False) -> List[Tuple[Study, Path]]:
    """(study, output directory) of each study file of preset ``name`` run into ``out``:
    ``out`` itself for a one-file preset, ``out/<study name>`` for each file otherwise."""
    out = Path(out)
    studies = load_preset(name, quick=quick)
    if len(studies) == 1:
        return [(studies[0], out)]
    return [(st, out / st.name) for st in studies]


def reproduce(name: str, out, *, quick: bool = False, progress: bool = True, client=None,
              torch_threads: int = 1) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Run preset ``name`` into ``out``: one sub-directory per study file when
    there are several, plus the combined ``rates.csv`` and ``results.csv`` in ``out``.

    Resumable like :func:`moelab.studies.run_study`; ``client`` and
    ``torch_threads`` are passed to :func:`moelab.studies.run_studies`: serial,
    the studies run one after the other; on a cluster the batches of every
    study are one pool, largest first. Returns (results, rates).

    Raises
    ------
    StudyError
        Unknown preset, or ``out`` (or a sub-directory) holding another study.
    """
    from .report import plot_overview
    from .runner import run_studies

    out = Path(out)
    runs = preset_runs(name, out, quick=quick)
    frames = run_studies(runs, progress=progress, client=client, torch_threads=torch_threads, desc=name)
    if len(runs) == 1:
        return frames[0], pd.read_csv(out / "rates.csv")
    rates = [pd.read_csv(sub / "rates.csv") for _st, sub in runs]
    res, rt = pd.concat(frames, ignore_index=True), pd.concat(rates, ignore_index=True)
    res.to_csv(out / "results.csv", index=False)
    rt.to_csv(out / "rates.csv", index=False, float_format="%.4g")
    plot_overview(res, rt, out / "overview.png", name)
    if all(st.truth.regression for st, _sub in runs):
        from .lse import compare_gates, plot_gate_comparison

        compare_gates(res, rt).to_csv(out / "gate-comparison.csv", index=False, float_format="%.4g")
        plot_gate_comparison(res, out / "gate-comparison.png", name)
    return res, rt
