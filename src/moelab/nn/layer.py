"""The MoE layer: router → dispatch → experts → combine, plus its auxiliary losses."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed
from torch import nn

from moelab.nn.config import MoEConfig
from moelab.nn.dispatch import Dispatch, sort_by_expert, token_capacity
from moelab.nn.experts import Experts
from moelab.nn.losses import load_balancing_loss, router_z_loss
from moelab.nn.routers import DenseToSparseRouter, RouterOutput, build_router, expert_bias_update

__all__ = ["MoELayer", "MoEOutput"]


class MoEOutput(NamedTuple):
    """What :meth:`MoELayer.forward` returns.

    Attributes
    ----------
    output : Tensor of shape (..., d_model)
        Same shape and dtype as the input.
    load_balancing_loss : Tensor of shape ()
        Switch Transformer eqs. (4)–(6) (:func:`moelab.nn.load_balancing_loss`).
    z_loss : Tensor of shape ()
        ST-MoE router z-loss (:func:`moelab.nn.router_z_loss`).
    tokens_per_expert : LongTensor of shape (n_experts,)
        Assignments processed by each routed expert (after capacity drops).
    n_dropped : int
        Token-choice: assignments dropped by the capacity limit.
        Expert-choice: real tokens that no expert chose.
    fraction_dropped : float
        ``n_dropped`` over the assignments (token-choice) or real tokens
        (expert-choice).
    """

    output: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    n_dropped: int
    fraction_dropped: float


class MoELayer(nn.Module):
    """Sparse mixture-of-experts feed-forward layer with a choice of gate.

    ``y(x) = Σ_{e selected} g_e(x) f_e(x) + Σ_s f^shared_s(x)``, with the
    gate ``g`` from :mod:`moelab.nn.routers`, routed experts ``f_e`` and
    optional always-on shared experts ``f^shared`` (DeepSeekMoE, Dai et al.
    2024, Sec. 3.2). Tokens are sorted by expert and each expert runs one
    matmul pair on its contiguous block (no loop over tokens).

    Parameters
    ----------
    config : MoEConfig
    dtype : torch.dtype, optional
        Dtype of the expert weights; the router is always float32.

    Examples
    --------
    >>> layer = MoELayer(MoEConfig(d_model=16, d_ff=32, n_experts=4, top_k=2))
    >>> out = layer(torch.randn(2, 5, 16))
    >>> loss = out.output.square().mean() + 1e-2 * out.load_balancing_loss
    """

    def __init__(self, config: MoEConfig, *, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.config = config
        self.router = build_router(config)
        self.experts = self.build_experts(config, dtype)
        self.shared_experts = (
            Experts(
                config.n_shared_experts,
                config.d_model,
                config.d_ff_shared or config.d_ff,
                config.expert,
                config.expert_activation,
                dtype,
            )
            if config.n_shared_experts
            else None
        )

    def build_experts(self, config: MoEConfig, dtype: Optional[torch.dtype]) -> Experts:
        """The routed experts (all ``n_experts`` here; a slice of them in :class:`ExpertParallelMoE`)."""
        return Experts(config.n_experts, config.d_model, config.d_ff, config.expert, config.expert_activation, dtype,
                       reuse_buffers=config.reuse_buffers, fused_elementwise=config.fused_elementwise)

    @property
    def is_causal(self) -> bool:
        """False for expert-choice routing (routing looks at the whole batch)."""
        return self.config.is_causal

    @property
    def temperature(self) -> Optional[float]:
        """Current router temperature (dense-to-sparse routers), else None."""
        return self.router.temperature if isinstance(self.router, DenseToSparseRouter) else None

    def advance_schedule(self, n: int = 1) -> None:
        """Advance the temperature schedule by ``n`` steps (no-op for routers without one)."""
        if isinstance(self.router, DenseToSparseRouter):
            self.router.advance(n)

    @property
    def expert_bias(self) -> Optional[torch.Tensor]:
        """The auxiliary-loss-free balancing bias, shape (n_experts,), float32; None when disabled."""
        return self.router.expert_bias

    def update_expert_bias(self, group=None) -> torch.Tensor:
        """One step of auxiliary-loss-free load balancing; call it once per optimiser step.

        ``b ← b + Δb`` with ``Δb_e = γ sign(mean(load) - load_e)`` recentred
        to zero mean (:func:`moelab.nn.expert_bias_update`; DeepSeek-V3,
        arXiv 2412.19437, Sec. 2.1.2), where ``load_e`` is the number of
        assignments the router gave expert ``e`` (real tokens, before
        capacity drops) in the training-mode forwards since the last call
        — all micro-batches of a gradient-accumulation step count. The
        counter is then reset. Under :class:`ExpertParallelMoE` the loads are
        summed over the expert-parallel group first, so every rank applies
        the same update: every rank must call it (it is a collective).

        Parameters
        ----------
        group : ProcessGroup, optional
            Also sum the loads over this ``torch.distributed`` group (an
            all-reduce every member must join) — the data-parallel group
            when the layer is replicated (DDP), so the replicas keep one
            bias computed from all their tokens instead of drifting apart.

        Returns
        -------
        LongTensor of shape (n_experts,)
            The load used (global under expert parallelism).

        Raises
        ------
        RuntimeError
            If the layer was built without ``MoEConfig(expert_bias_update_rate=γ)``.
        """
        router = self.router
        if router.expert_bias is None:
            raise RuntimeError(
                "update_expert_bias needs auxiliary-loss-free balancing: build the layer with "
                "MoEConfig(expert_bias_update_rate=1e-3) (γ of DeepSeek-V3), or do not call it"
            )
        with torch.no_grad():
            load = self.global_expert_load(router.expert_load.clone())
            if group is not None:
                torch.distributed.all_reduce(load, group=group)
            router.expert_bias += expert_bias_update(load, self.config.expert_bias_update_rate)
            router.expert_load.zero_()
        return load

    def global_expert_load(self, load: torch.Tensor) -> torch.Tensor:
        """The per-expert load over every process holding a replica of the router (here: ``load`` itself)."""
        return load

    def check_input(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Raise a clear error for a bad ``x`` or ``mask``; never modifies them.

        Raises
        ------
        TypeError
            ``x`` not a floating tensor, or a dtype different from the experts';
            ``mask`` not bool.
        ValueError
            ``x`` not of shape (..., d_model) (zero tokens are allowed);
            ``mask`` not of shape ``x.shape[:-1]``; NaN/inf in ``x`` (when
            ``config.validate_inputs``).
        """
        d_model = self.config.d_model
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
        if x.dim() < 2 or x.shape[-1] != d_model:
            raise ValueError(
                f"x must have shape (..., d_model={d_model}) with at least one leading dim, "
                f"got {tuple(x.shape)}; reshape it or build the layer with d_model={x.shape[-1] if x.dim() else '?'}"
            )
        expected = self.experts.w_in.dtype
        if x.dtype != expected:
            raise TypeError(
                f"x has dtype {x.dtype} but the expert weights are {expected}; "
                f"cast x with x.to({expected}) or the layer with layer.to({x.dtype})"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor (True = real token, False = padding)")
            if mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(mask.shape)}"
                )
        # a sum is finite iff no element is NaN/inf, unless finite values overflow it: then count exactly
        if self.config.validate_inputs and not bool(torch.isfinite(x.sum())):
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                raise ValueError(
                    f"x contains {int(bad.sum())} NaN/inf values; fix the upstream computation "
                    f"(or set MoEConfig(validate_inputs=False) to skip this check)"
                )

    def dispatch(self, routing: RouterOutput, n_tokens: int, n_real: int) -> Dispatch:
        """Sort the router's assignments by expert, applying the token-choice capacity."""
        capacity = None
        if self.config.router != "expert_choice":
            capacity = token_capacity(self.config.capacity_factor, n_real, self.config.top_k, self.config.n_experts)
        return sort_by_expert(routing.token_idx, routing.expert_idx, routing.weight, self.config.n_experts, capacity)

    def apply_experts(self, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """Routed experts' weighted outputs per token, shape (n_tokens, d_model) (:meth:`Experts.routed`)."""
        return self.experts.routed(x, dispatch.token_idx, dispatch.weight, dispatch.counts_list)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> MoEOutput:
        """Apply the layer.

        Parameters
        ----------
        x : Tensor of shape (..., d_model)
            Floating, same dtype as the expert weights. Not modified. It may
            hold zero tokens (e.g. shape (0, d_model)): the output is then
            empty of the same shape, the losses are 0 (still part of the
            autograd graph), ``tokens_per_expert`` is all zeros. Under expert
            parallelism such a rank still takes part in both all-to-alls.
        mask : BoolTensor of shape x.shape[:-1], optional
            True for real tokens, False for padding. Padding tokens are not
            routed, get output 0 and are ignored by the losses.

        Returns
        -------
        MoEOutput

        Raises
        ------
        TypeError, ValueError
            See :meth:`check_input`.
        """
        self.check_input(x, mask)
        xf = x.reshape(-1, self.config.d_model)  # [T, d]
        m = None if mask is None else mask.reshape(-1)
        n_tokens = xf.shape[0]
        n_real = n_tokens if m is None else int(m.sum())
        routing = self.router(xf, m)
        disp = self.dispatch(routing, n_tokens, n_real)
        out = self.apply_experts(xf, disp)
        if self.shared_experts is not None:
            shared = self.shared_experts.dense(xf)
            out = out + (shared if m is None else shared * m.unsqueeze(-1).to(shared.dtype))
        if self.config.router == "expert_choice":
            chosen = torch.zeros(n_tokens, dtype=torch.bool, device=xf.device)
            chosen[disp.token_idx] = True
            n_dropped = n_real - int(chosen.sum())
            fraction = n_dropped / max(n_real, 1)
        else:
            n_dropped = disp.n_dropped
            fraction = n_dropped / max(disp.n_assigned, 1)
        return MoEOutput(
            output=out.view(x.shape),
            load_balancing_loss=load_balancing_loss(routing.probs, routing.expert_idx, m),
            z_loss=router_z_loss(routing.logits, m),
            tokens_per_expert=disp.counts,
            n_dropped=n_dropped,
            fraction_dropped=fraction,
        )
