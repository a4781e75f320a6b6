"""The one validated configuration object of an MoE layer."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from moelab.activations import resolve_activation
from moelab.nn.elementwise import resolve_fused_elementwise

__all__ = ["MoEConfig", "ROUTERS", "ROUTER_ALIASES", "EXPERT_KINDS", "NOISE_KINDS", "SCHEDULES"]

ROUTERS = (
    "topk_softmax",
    "dense_to_sparse",
    "activation_dense_to_sparse",
    "sigmoid",
    "expert_choice",
)
# names of moelab's statistical gates (moelab.gates.GATES) that are the same gate as a layer router
ROUTER_ALIASES = {
    "topk": "topk_softmax",
    "temperature": "dense_to_sparse",
    "activation": "activation_dense_to_sparse",
}
EXPERT_KINDS = ("swiglu", "mlp")
NOISE_KINDS = (None, "gumbel", "jitter")
SCHEDULES = ("constant", "linear", "exponential", "cosine")


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of :class:`moelab.nn.MoELayer`.

    Parameters
    ----------
    d_model : int
        Width of the token representations (input and output feature size).
    d_ff : int
        Hidden width of each routed expert.
    n_experts : int
        Number of routed experts ``E``.
    top_k : int, default 2
        Experts per token (token-choice routers), or the average number of
        experts per token ``c`` of expert-choice routing (Zhou et al. 2022).
        Must satisfy ``1 <= top_k <= n_experts``.
    router : str, default "topk_softmax"
        One of ``"topk_softmax"``, ``"dense_to_sparse"`` (temperature softmax,
        logits ``Wx/τ + b``), ``"activation_dense_to_sparse"`` (logits
        ``σ(Wx)/τ + b``), ``"sigmoid"`` and ``"expert_choice"``. The names of
        the statistical gates (:data:`moelab.gates.GATES`) are accepted for
        the same gate: ``"topk"`` (→ ``"topk_softmax"``), ``"temperature"``
        (→ ``"dense_to_sparse"``), ``"activation"`` (→
        ``"activation_dense_to_sparse"``); ``config.router`` then holds the
        layer's name (:data:`ROUTER_ALIASES`). The dense statistical
        ``"softmax"`` gate is ``router="topk_softmax", top_k=n_experts``.
    normalize_weights : bool, default False
        Renormalise the selected weights of a token to sum to one (Mixtral
        does this for top-k softmax; for the sigmoid router it normalises over
        the selected experts). Not allowed with ``top_k=1``: every weight
        would be 1 and the router would get no gradient from the task loss.
    router_bias : bool, default False
        Learn the intercept ``β_0`` of the gate logits.
    tau_max, tau_min : float, default 1.0, 1.0
        Temperature schedule of the dense-to-sparse routers, from ``tau_max``
        down to the floor ``tau_min > 0``.
    schedule : str, default "constant"
        ``"constant"`` (τ = tau_max), ``"linear"``, ``"exponential"`` or
        ``"cosine"``; see :class:`moelab.nn.TemperatureSchedule`.
    schedule_steps : int, default 1
        Number of steps from ``tau_max`` to ``tau_min``.
    prune_threshold : float or None, default None
        Dense-to-sparse routers: drop selected experts whose weight is below
        this value, always keeping the best one (EvoMoE, Nie et al. 2021).
    gate_activation : str or callable, default "tanh"
        σ of the activation dense-to-sparse router; a name of
        :data:`moelab.activations.ACTIVATIONS` or a callable.
    expert : str, default "swiglu"
        ``"swiglu"`` (``W2 (silu(Wg x) * (Wu x))``) or ``"mlp"``
        (``W2 act(W1 x)``).
    expert_activation : str or callable, default "gelu"
        Activation of ``"mlp"`` experts.
    n_shared_experts : int, default 0
        Always-on experts added to every token (DeepSeekMoE, Dai et al. 2024).
    d_ff_shared : int or None, default None
        Hidden width of each shared expert; ``None`` means ``d_ff``.
    capacity_factor : float or None, default None
        ``None`` is dropless (token-choice routers). Otherwise a real number
        ``> 0``: each expert takes at most
        ``ceil(capacity_factor * n_tokens * top_k / n_experts)`` assignments
        and the rest are dropped and counted (Fedus et al. 2022, Sec. 2.2).
        ``math.inf`` is the limit of no capacity: token-choice routing is
        then exactly dropless (as ``None``; :attr:`dropless` is True).
        Expert-choice routing uses it as its capacity multiplier (``None``
        means 1.0) and needs it finite.
    noise : {None, "gumbel", "jitter"}, default None
        Router noise, applied in training mode only: Gumbel(0, 1) noise added
        to the logits (after the temperature, for the dense-to-sparse
        routers), or multiplicative jitter ``x * U(1-eps, 1+eps)`` of the
        router input (Switch Transformer).
    noise_eps : float, default 1e-2
        Jitter half-width ``eps`` in ``(0, 1)``.
    validate_inputs : bool, default True
        Check inputs for NaN/inf in ``forward`` (shape and dtype are always
        checked).
    expert_bias_update_rate : float or None, default None
        γ of auxiliary-loss-free load balancing (DeepSeek-V3, Liu et al.
        2024, arXiv 2412.19437, Sec. 2.1.2; 1e-3 there). ``None`` turns it
        off. When set, the router holds a per-expert bias ``b`` (buffer
        ``router.expert_bias``, zero at start, saved in the state dict) that
        is added to the routing scores for the *selection* of the top-k
        experts only (the combination weights are the unbiased scores), and
        :meth:`MoELayer.update_expert_bias` moves it by
        ``γ · sign(mean_load - load_e)``, recentred to zero mean, from the
        assignments counted in training-mode forwards since the last
        update. Token-choice routers only (expert choice is balanced by
        construction).
    reuse_buffers : bool, default True
        Keep the routed experts' intermediates saved for backward, their
        backward temporaries, weight gradients and output in memory reused
        from call to call (:class:`moelab.nn.grouped.Workspace`; a gradient
        or output is reused only once nothing refers to it any more): on CPU
        this avoids page-faulting that memory afresh on every call (~200 MB
        in ``benchmarks/nn_layer.py``), at the cost of keeping it allocated
        between calls (``layer.experts.workspace.clear()`` frees it).
        ``False`` allocates it afresh every time.
    fused_elementwise : {False, "auto", True}, default False
        Run the routed experts' element-wise work between their matmuls
        (the SwiGLU forward with the factors of its derivative, the weighted
        combine of the outputs and of the input gradient) as kernels that
        ``torch.compile`` (Inductor's C++ backend on CPU) fuses into one pass
        each (:mod:`moelab.nn.elementwise`; the matmuls stay in ATen).
        ``False``: eager, no compilation. ``"auto"``: compiled on CPU for
        float32 / bfloat16 calls with at least
        :data:`~moelab.nn.elementwise.AUTO_MIN_ELEMENTS` (2**20)
        assignments × d_ff, eager otherwise; ``True``: compiled for every
        call (any dtype and device). Opt-in because it pays only over long
        runs: about 1 % per forward+backward on ``benchmarks/nn_layer.py``,
        against a first call that compiles for seconds (4 s with Inductor's
        cache warm, 17 s cold, once per process and dtype, and again for
        each new intra-op thread count). If compiling fails the layer runs
        eagerly and says so once (``RuntimeWarning`` for True, a
        ``moelab.nn`` log record for "auto"). Results agree with the eager
        path to rounding.

    Raises
    ------
    TypeError
        ``capacity_factor`` or ``expert_bias_update_rate`` not a real number
        (a bool or a string, say); ``reuse_buffers`` not a bool;
        ``fused_elementwise`` not "auto", True or False.
    ValueError
        For any value outside the ranges above, with the fix in the message.
    """

    d_model: int
    d_ff: int
    n_experts: int
    top_k: int = 2
    router: str = "topk_softmax"
    normalize_weights: bool = False
    router_bias: bool = False
    tau_max: float = 1.0
    tau_min: float = 1.0
    schedule: str = "constant"
    schedule_steps: int = 1
    prune_threshold: Optional[float] = None
    gate_activation: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "tanh"
    expert: str = "swiglu"
    expert_activation: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "gelu"
    n_shared_experts: int = 0
    d_ff_shared: Optional[int] = None
    capacity_factor: Optional[float] = None
    noise: Optional[str] = None
    noise_eps: float = 1e-2
    validate_inputs: bool = True
    expert_bias_update_rate: Optional[float] = None
    reuse_buffers: bool = True
    fused_elementwise: Union[str, bool] = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "n_experts", "top_k", "schedule_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} is larger than n_experts={self.n_experts}; "
                f"choose top_k <= n_experts (moelab never lowers it for you)"
            )
        if isinstance(self.router, str) and self.router in ROUTER_ALIASES:
            object.__setattr__(self, "router", ROUTER_ALIASES[self.router])  # a documented alias, not a fix
        if self.router == "softmax":
            raise ValueError(
                "router 'softmax' (the dense statistical gate) has no sparse layer router of that name; "
                "use router='topk_softmax' with top_k=n_experts for the dense softmax gate, or a smaller top_k"
            )
        if self.router == "gaussian":
            raise ValueError(
                "router 'gaussian' (the statistical Gaussian gate, a density model of x fitted by EM on the joint "
                "likelihood of (x, y)) has no layer router; use a token-choice router such as 'topk_softmax'"
            )
        if self.router not in ROUTERS:
            raise ValueError(
                f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)} "
                f"(or a statistical gate name: {', '.join(ROUTER_ALIASES)})"
            )
        if self.expert not in EXPERT_KINDS:
            raise ValueError(f"unknown expert {self.expert!r}; choose one of {', '.join(EXPERT_KINDS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {self.noise!r}; choose None, 'gumbel' or 'jitter'")
        if not (self.tau_min > 0):
            raise ValueError(
                f"tau_min={self.tau_min!r} must be > 0: the temperature divides the logits, "
                f"so a schedule reaching 0 is undefined; use a small positive floor such as 0.05"
            )
        if not (self.tau_max >= self.tau_min):
            raise ValueError(
                f"tau_max={self.tau_max!r} must be >= tau_min={self.tau_min!r}; "
                f"the schedule goes from tau_max down to the floor tau_min"
            )
        dense_to_sparse = self.router in ("dense_to_sparse", "activation_dense_to_sparse")
        if not dense_to_sparse and (self.tau_max != 1.0 or self.tau_min != 1.0 or self.schedule != "constant"):
            raise ValueError(
                f"tau_max/tau_min/schedule apply to the dense-to-sparse routers only, not {self.router!r}; "
                f"use router='dense_to_sparse' or 'activation_dense_to_sparse', or leave them at their defaults"
            )
        if self.prune_threshold is not None:
            if self.router not in ("dense_to_sparse", "activation_dense_to_sparse"):
                raise ValueError(
                    f"prune_threshold applies to the dense-to-sparse routers only, not {self.router!r}; "
                    f"set prune_threshold=None or router='dense_to_sparse'"
                )
            if not (0.0 < self.prune_threshold < 1.0):
                raise ValueError(f"prune_threshold must be in (0, 1), got {self.prune_threshold!r}")
        if self.normalize_weights and self.top_k == 1 and self.router != "expert_choice":
            raise ValueError(
                "normalize_weights=True with top_k=1 makes every routing weight exactly 1, "
                "so the router gets no gradient from the task loss; set normalize_weights=False"
            )
        if self.normalize_weights and self.router == "expert_choice":
            raise ValueError("normalize_weights is not defined for expert_choice routing; set it to False")
        self._check_capacity_factor()
        self._check_expert_bias_update_rate()
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an int >= 0, got {self.n_shared_experts!r}")
        if self.d_ff_shared is not None and (not isinstance(self.d_ff_shared, int) or self.d_ff_shared < 1):
            raise ValueError(f"d_ff_shared must be a positive int or None, got {self.d_ff_shared!r}")
        if not isinstance(self.reuse_buffers, bool):
            raise TypeError(f"reuse_buffers must be True or False, got {self.reuse_buffers!r}")
        resolve_fused_elementwise(self.fused_elementwise)
        if not (0.0 < self.noise_eps < 1.0):
            raise ValueError(f"noise_eps must be in (0, 1), got {self.noise_eps!r}")
        resolve_activation(self.gate_activation)
        resolve_activation(self.expert_activation)

    def _check_capacity_factor(self) -> None:
        cf = self.capacity_factor
        if cf is None:
            return
        if isinstance(cf, bool) or not isinstance(cf, numbers.Real):
            raise TypeError(
                f"capacity_factor must be a real number > 0 or None (dropless), got {cf!r} "
                f"of type {type(cf).__name__}; pass a float such as capacity_factor=1.25"
            )
        if math.isnan(cf) or not (cf > 0):
            raise ValueError(
                f"capacity_factor must be > 0 or None (dropless), got {cf!r}; "
                f"use a value such as 1.25, or None / math.inf for no capacity limit"
            )
        if math.isinf(cf) and self.router == "expert_choice":
            raise ValueError(
                "capacity_factor=inf is not defined for expert_choice routing (it is the capacity multiplier "
                "C = capacity_factor * n * top_k / n_experts); use a finite value, e.g. "
                "capacity_factor=n_experts/top_k lets every expert take every token"
            )

    def _check_expert_bias_update_rate(self) -> None:
        rate = self.expert_bias_update_rate
        if rate is None:
            return
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(
                f"expert_bias_update_rate must be a real number > 0 or None (off), got {rate!r} "
                f"of type {type(rate).__name__}; DeepSeek-V3 uses 1e-3"
            )
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(
                f"expert_bias_update_rate must be a finite number > 0 or None (off), got {rate!r}; "
                f"DeepSeek-V3 uses 1e-3"
            )
        if self.router == "expert_choice":
            raise ValueError(
                "expert_bias_update_rate applies to token-choice routers; expert_choice routing is balanced "
                "by construction: set expert_bias_update_rate=None or choose a token-choice router"
            )

    @property
    def dropless(self) -> bool:
        """True when no token-choice assignment can be dropped (``capacity_factor`` None or inf)."""
        if self.router == "expert_choice":
            return False
        return self.capacity_factor is None or math.isinf(self.capacity_factor)

    @property
    def is_causal(self) -> bool:
        """False for expert-choice routing: a token's routing depends on later tokens."""
        return self.router != "expert_choice"
