"""Routers: gate logits → (token, expert, weight) assignments, computed in float32.

Every router returns a :class:`RouterOutput` holding the assignments as three
flat tensors, so token-choice and expert-choice routing feed the same dispatch
(:mod:`moelab.nn.dispatch`). The gate family is the one of the statistical
side (``docs/nn.md``; Nguyen, Akbarian & Ho, ICML 2024, arXiv 2401.13875):

============================  =====================================================
router                        weights of token x
============================  =====================================================
topk_softmax                  top-k of softmax(Wx + b)
dense_to_sparse               top-k of softmax(Wx / τ + b), τ scheduled, pruned
activation_dense_to_sparse    top-k of softmax(σ(Wx) / τ + b), σ of moelab.activations
sigmoid                       top-k of sigmoid(Wx + b), optionally normalised
expert_choice                 each expert takes its top-C tokens of softmax(Wx + b)
============================  =====================================================

With ``MoEConfig(expert_bias_update_rate=γ)`` the token-choice routers select
the top-k of ``scores + expert_bias`` and weight by the unbiased scores
(auxiliary-loss-free balancing, DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2);
:func:`expert_bias_update` is the update of the bias.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moelab.activations import resolve_activation
from moelab.nn.config import MoEConfig
from moelab.nn.schedules import TemperatureSchedule

__all__ = [
    "RouterOutput",
    "Router",
    "TopKSoftmaxRouter",
    "DenseToSparseRouter",
    "SigmoidRouter",
    "ExpertChoiceRouter",
    "build_router",
    "expert_bias_update",
]


class RouterOutput(NamedTuple):
    """Result of a router.

    Attributes
    ----------
    logits : Tensor of shape (n_tokens, n_experts), float32
        Clean gate logits (no noise); used by the z-loss.
    probs : Tensor of shape (n_tokens, n_experts), float32
        Router probabilities (rows sum to one); the ``P_i`` of the
        load-balancing loss.
    token_idx, expert_idx : LongTensor of shape (n_assign,)
        One entry per (token, expert) assignment, in priority order (all
        first choices, then all second choices, ... for token-choice routers).
        Padding tokens never appear.
    weight : Tensor of shape (n_assign,), float32
        Combination weight of each assignment (differentiable).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    token_idx: torch.Tensor
    expert_idx: torch.Tensor
    weight: torch.Tensor


class Router(nn.Module):
    """Base class: linear gate ``Wx + b`` in float32 plus training-only noise.

    Parameters
    ----------
    config : MoEConfig
        Uses ``d_model``, ``n_experts``, ``top_k``, ``router_bias``,
        ``noise``, ``noise_eps``, ``normalize_weights``,
        ``expert_bias_update_rate``.

    Attributes
    ----------
    weight : Parameter of shape (n_experts, d_model), float32
    bias : Parameter of shape (n_experts,) or None
        The learned intercept β₀ (``router_bias=True``); it enters the
        logits, so it changes the weights too.
    expert_bias : buffer of shape (n_experts,), float32, or None
        Auxiliary-loss-free balancing bias (``expert_bias_update_rate``
        set): added to the scores for the top-k selection only
        (:meth:`biased`), updated by :meth:`MoELayer.update_expert_bias`.
    expert_load : buffer of shape (n_experts,), int64, or None
        Assignments per expert counted in training-mode forwards since the
        last update (:meth:`count_load`).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.d_model, dtype=torch.float32))
        self.bias = (
            nn.Parameter(torch.zeros(config.n_experts, dtype=torch.float32)) if config.router_bias else None
        )
        nn.init.normal_(self.weight, std=config.d_model**-0.5)
        # auxiliary-loss-free balancing (DeepSeek-V3): selection bias and the load counted since its last update
        balanced = config.expert_bias_update_rate is not None
        self.register_buffer("expert_bias", torch.zeros(config.n_experts, dtype=torch.float32) if balanced else None)
        self.register_buffer("expert_load", torch.zeros(config.n_experts, dtype=torch.long) if balanced else None)

    def biased(self, scores: torch.Tensor) -> torch.Tensor:
        """Selection scores ``s + b`` with the expert bias ``b`` (when enabled), else ``scores``.

        DeepSeek-V3 (arXiv 2412.19437), Sec. 2.1.2, Eq. (16): the bias
        enters the top-k *selection* only; the combination weights are
        gathered from the unbiased scores.

        Parameters
        ----------
        scores : Tensor of shape (n_tokens, n_experts)

        Returns
        -------
        Tensor of shape (n_tokens, n_experts)
        """
        return scores if self.expert_bias is None else scores + self.expert_bias

    def count_load(self, expert: torch.Tensor) -> None:
        """Add the assignments of a training-mode forward to ``expert_load`` (when the expert bias is enabled).

        Parameters
        ----------
        expert : LongTensor of shape (n_assign,)
            Expert of every assignment of a real token, before capacity drops.
        """
        if self.expert_load is not None and self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(expert, minlength=self.n_experts)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` in float32, with jitter noise on ``x`` in training; shape (n_tokens, n_experts)."""
        x = x.float()
        if self.training and self.config.noise == "jitter":
            eps = self.config.noise_eps
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)  # new tensor, caller's x untouched
        return F.linear(x, self.weight.float())

    def add_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits + b`` (float32) when the router has a bias, else ``logits``; shape (n_tokens, n_experts)."""
        return logits if self.bias is None else logits + self.bias.float()

    def noisy(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits plus Gumbel(0, 1) noise in training mode when ``noise="gumbel"``."""
        if self.training and self.config.noise == "gumbel":
            return logits - torch.empty_like(logits).exponential_().log()
        return logits

    def select_top_k(
        self, scores: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k experts of each token.

        Parameters
        ----------
        scores : Tensor of shape (n_tokens, n_experts)
            Ranking criterion (may include noise).
        weights : Tensor of shape (n_tokens, n_experts)
            Weights gathered at the selected experts.

        Returns
        -------
        rank, token, expert, weight : Tensors of shape (n_tokens * top_k,)
            Rank-major order (every token's first choice, then every second choice, ...).
        """
        n_tokens = scores.shape[0]
        _, top_idx = scores.topk(self.top_k, dim=-1)  # [T, k]
        top_w = weights.gather(1, top_idx)  # [T, k]
        rank = torch.arange(self.top_k, device=scores.device).repeat_interleave(n_tokens)
        token = torch.arange(n_tokens, device=scores.device).repeat(self.top_k)
        return rank, token, top_idx.t().reshape(-1), top_w.t().reshape(-1)

    @staticmethod
    def drop_padding(mask: Optional[torch.Tensor], *tensors: torch.Tensor, token: torch.Tensor):
        """Remove the assignments of padding tokens.

        Parameters
        ----------
        mask : BoolTensor of shape (n_tokens,) or None
            True for real tokens; None keeps everything.
        *tensors : Tensors of shape (n_assign,)
        token : LongTensor of shape (n_assign,)
            Token of each assignment.

        Returns
        -------
        tuple of Tensors of shape (n_kept,)
        """
        if mask is None:
            return tensors
        keep = mask[token]
        return tuple(t[keep] for t in tensors)


def _normalise_per_token(weight: torch.Tensor, token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    total = weight.new_zeros(n_tokens).index_add(0, token, weight)
    return weight / total[token]


def expert_bias_update(load: torch.Tensor, rate: float) -> torch.Tensor:
    """Update of the auxiliary-loss-free balancing bias: ``Δb_e = γ sign(mean(load) - load_e)``, recentred.

    DeepSeek-V3 (Liu et al. 2024, arXiv 2412.19437), Sec. 2.1.2: after each
    step, the bias of an overloaded expert is decreased by γ and that of an
    underloaded expert increased by γ. The update is then recentred to zero
    mean (as torchtitan does), which leaves the top-k selection unchanged
    (it is invariant to adding a constant to every expert's score) and keeps
    the bias bounded. The sign is computed exactly in integers, as
    ``sign(Σ_j load_j - E load_e)``.

    Parameters
    ----------
    load : LongTensor of shape (n_experts,)
        Assignments per expert since the last update (summed over ranks
        under expert parallelism).
    rate : float
        γ > 0 (``MoEConfig.expert_bias_update_rate``).

    Returns
    -------
    Tensor of shape (n_experts,), float32
        ``Δb``, with zero mean; all zeros when every expert has the mean load
        (or no token was counted).

    Raises
    ------
    ValueError
        If ``load`` is not a 1-D integer tensor or ``rate`` is not > 0.
    """
    if load.dim() != 1 or load.is_floating_point() or load.is_complex():
        raise ValueError(f"load must be a 1-D integer tensor of counts per expert, got {load.dtype} {tuple(load.shape)}")
    if not (rate > 0):
        raise ValueError(f"rate must be > 0, got {rate!r}")
    delta = rate * torch.sign(load.sum() - load.numel() * load).to(torch.float32)
    return delta - delta.mean()


class TopKSoftmaxRouter(Router):
    """Top-k softmax gate: weights are the k largest of ``softmax(Wx + b)``.

    With ``normalize_weights`` the k weights are divided by their sum
    (Mixtral; Jiang et al. 2024). Source: Shazeer et al. 2017, Eq. (3)–(5)
    (without their noise network); Fedus et al. 2022 (Switch, k = 1).

    ``forward(x, mask)`` takes ``x`` of shape (n_tokens, d_model) and an
    optional bool ``mask`` of shape (n_tokens,) (True = real token) and
    returns a :class:`RouterOutput`.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RouterOutput:
        logits = self.add_bias(self.linear(x))
        probs = torch.softmax(self.noisy(logits), dim=-1)
        _, token, expert, weight = self.select_top_k(self.biased(probs), probs)
        if self.config.normalize_weights:
            weight = _normalise_per_token(weight, token, x.shape[0])
        token, expert, weight = self.drop_padding(mask, token, expert, weight, token=token)
        self.count_load(expert)
        return RouterOutput(logits, probs, token, expert, weight)


class DenseToSparseRouter(Router):
    """Dense-to-sparse gate with a temperature schedule.

    Logits ``l(x) = σ(Wx) / τ + b`` with σ the identity (``router=
    "dense_to_sparse"``: the temperature softmax gate) or a non-linear σ of
    :data:`moelab.activations.ACTIVATIONS` (``"activation_dense_to_sparse"``).
    Weights are the ``top_k`` largest of ``softmax(l)`` (``top_k =
    n_experts`` is fully dense); with ``prune_threshold`` the selected
    weights below it are dropped, keeping each token's best expert (EvoMoE,
    Nie et al. 2021, Sec. 3.2). τ follows :class:`TemperatureSchedule`; call
    :meth:`advance` once per training step.

    Sources: Nguyen, Akbarian & Ho, ICML 2024 (arXiv 2401.13875), Eq. (2)
    (temperature gate) and Sec. 4 (activation dense-to-sparse gate); Nie et
    al. 2021 (EvoMoE) for the schedule and pruning.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.schedule = TemperatureSchedule(
            config.tau_max, config.tau_min, config.schedule, config.schedule_steps
        )
        self.activation = (
            resolve_activation(config.gate_activation)
            if config.router == "activation_dense_to_sparse"
            else None
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def temperature(self) -> float:
        """Current τ = schedule(step)."""
        return self.schedule(int(self.step))

    def advance(self, n: int = 1) -> None:
        """Move the schedule ``n`` steps forward."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.step += n

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RouterOutput:
        pre = self.linear(x)
        if self.activation is not None:
            pre = self.activation(pre)
        logits = self.add_bias(pre / self.temperature)
        probs = torch.softmax(self.noisy(logits), dim=-1)
        rank, token, expert, weight = self.select_top_k(self.biased(probs), probs)
        threshold = self.config.prune_threshold
        if threshold is not None:
            keep = (rank == 0) | (weight >= threshold)
            rank, token, expert, weight = rank[keep], token[keep], expert[keep], weight[keep]
        if self.config.normalize_weights:
            weight = _normalise_per_token(weight, token, x.shape[0])
        token, expert, weight = self.drop_padding(mask, token, expert, weight, token=token)
        self.count_load(expert)
        return RouterOutput(logits, probs, token, expert, weight)


class SigmoidRouter(Router):
    """Sigmoid gate: weights are the k largest of ``sigmoid(Wx + b)``.

    Not normalised (the statistical sigmoid gate), or, with
    ``normalize_weights``, divided by their sum over the selected experts
    (DeepSeek-V3, 2024, Eq. (13)). The load-balancing ``probs`` are the
    scores divided by their sum over all experts.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RouterOutput:
        logits = self.add_bias(self.linear(x))
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        # ranking by the (noisy) logits is ranking by their sigmoid; with the expert bias the
        # bias is added to the sigmoid scores, as in DeepSeek-V3 Eq. (16)
        noisy = self.noisy(logits)
        select = noisy if self.expert_bias is None else self.biased(torch.sigmoid(noisy))
        _, token, expert, weight = self.select_top_k(select, scores)
        if self.config.normalize_weights:
            weight = _normalise_per_token(weight, token, x.shape[0])
        token, expert, weight = self.drop_padding(mask, token, expert, weight, token=token)
        self.count_load(expert)
        return RouterOutput(logits, probs, token, expert, weight)


class ExpertChoiceRouter(Router):
    """Expert-choice routing: each expert takes the C tokens with the highest ``softmax(Wx + b)``.

    ``C = max(1, min(n_real, floor(capacity_factor * n_real * top_k / n_experts)))``
    with ``capacity_factor`` 1.0 when unset (Zhou et al. 2022, Eq. (1)–(2),
    ``k = n c / e``). Perfectly balanced, but **not causal**: a token's
    routing depends on every other token of the batch, including later ones,
    so it must not be used for autoregressive decoding
    (``MoEConfig.is_causal`` is False). Padding tokens are never chosen.
    """

    is_causal = False

    def capacity(self, n_real: int) -> int:
        """Tokens per expert ``C`` for ``n_real`` real tokens (formula in the class docstring)."""
        factor = 1.0 if self.config.capacity_factor is None else self.config.capacity_factor
        c = factor * n_real * self.top_k / self.n_experts
        return n_real if c >= n_real else max(1, math.floor(c))  # compared first: a huge factor never overflows

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RouterOutput:
        logits = self.add_bias(self.linear(x))
        probs = torch.softmax(self.noisy(logits), dim=-1)  # [T, E]
        n_real = x.shape[0] if mask is None else int(mask.sum())
        device = x.device
        if n_real == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return RouterOutput(logits, probs, empty, empty, probs.new_zeros(0))
        scores = probs.detach()
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], -1.0)  # probs are >= 0: padding is never chosen
        cap = self.capacity(n_real)
        _, tok = scores.t().topk(cap, dim=-1)  # [E, C]
        expert = torch.arange(self.n_experts, device=device).repeat_interleave(cap)
        token = tok.reshape(-1)
        weight = probs[token, expert]
        return RouterOutput(logits, probs, token, expert, weight)


_ROUTERS = {
    "topk_softmax": TopKSoftmaxRouter,
    "dense_to_sparse": DenseToSparseRouter,
    "activation_dense_to_sparse": DenseToSparseRouter,
    "sigmoid": SigmoidRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(config: MoEConfig) -> Router:
    """The router named by ``config.router``.

    Parameters
    ----------
    config : MoEConfig

    Returns
    -------
    Router
        A module mapping ``x`` of shape (n_tokens, d_model) and an optional
        mask of shape (n_tokens,) to a :class:`RouterOutput`.
    """
    return _ROUTERS[config.router](config)
