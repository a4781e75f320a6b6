"""moelab.nn: a PyTorch mixture-of-experts layer with moelab's gate family.

Router (:mod:`~moelab.nn.routers`) → dispatch (:mod:`~moelab.nn.dispatch`)
→ experts with stacked weights (:mod:`~moelab.nn.experts`) → combine, in
:class:`MoELayer`; auxiliary losses in :mod:`~moelab.nn.losses`; expert
parallelism in :mod:`~moelab.nn.parallel`. See ``docs/nn.md``.
"""

from moelab.nn.config import MoEConfig
from moelab.nn.dispatch import Dispatch, combine, sort_by_expert, token_capacity
from moelab.nn.experts import Experts
from moelab.nn.grouped import fused_moe_ffn, grouped_ffn
from moelab.nn.layer import MoELayer, MoEOutput
from moelab.nn.losses import load_balancing_loss, router_z_loss
from moelab.nn.parallel import ExpertParallelMoE
from moelab.nn.reference import reference_forward
from moelab.nn.routers import (
    DenseToSparseRouter,
    ExpertChoiceRouter,
    Router,
    RouterOutput,
    SigmoidRouter,
    TopKSoftmaxRouter,
    build_router,
    expert_bias_update,
)
from moelab.nn.schedules import TemperatureSchedule

__all__ = [
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "ExpertParallelMoE",
    "Experts",
    "grouped_ffn",
    "fused_moe_ffn",
    "Router",
    "RouterOutput",
    "TopKSoftmaxRouter",
    "DenseToSparseRouter",
    "SigmoidRouter",
    "ExpertChoiceRouter",
    "build_router",
    "expert_bias_update",
    "TemperatureSchedule",
    "Dispatch",
    "sort_by_expert",
    "token_capacity",
    "combine",
    "load_balancing_loss",
    "router_z_loss",
    "reference_forward",
]
