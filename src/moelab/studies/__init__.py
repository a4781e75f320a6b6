"""Sample-efficiency (rate) studies: simulate a true MoE, fit it over a grid of
sample sizes with many replicates, and measure how fast each parameter converges.

* :mod:`~moelab.studies.config` — the study TOML schema and its validation.
* :mod:`~moelab.studies.simulate` — true model, data, truth-perturbed starts.
* :mod:`~moelab.studies.runner` — batched, checkpointed, resumable, shardable runs.
* :mod:`~moelab.studies.cluster` — the same runs on a Dask cluster (``--scheduler``).
* :mod:`~moelab.studies.report` — rates.csv and log-log plots.
* :mod:`~moelab.studies.presets` — named published studies (``moelab reproduce``).
"""

from .cluster import dask_client
from .config import FitSpec, Study, StudyError, load_study, parse_study
from .presets import PRESETS, load_preset
from .report import rate_table, write_report
from .runner import merge_results, run_studies, run_study

__all__ = [
    "Study",
    "FitSpec",
    "StudyError",
    "load_study",
    "parse_study",
    "run_study",
    "run_studies",
    "merge_results",
    "dask_client",
    "rate_table",
    "write_report",
    "PRESETS",
    "load_preset",
]
