"""Expert parallelism: each process holds n_experts / world_size experts; tokens travel by all-to-all."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from moelab.nn.config import MoEConfig
from moelab.nn.dispatch import Dispatch, combine
from moelab.nn.experts import Experts
from moelab.nn.layer import MoELayer

__all__ = ["ExpertParallelMoE"]


class _AllToAll(torch.autograd.Function):
    """Differentiable ``dist.all_to_all_single`` with split sizes (public collective only).

    The adjoint of an all-to-all is the all-to-all with the split sizes swapped, so the
    backward pass is a collective as well: every rank of the group must run it.
    (``torch.distributed.nn.functional.all_to_all_single`` did this and is deprecated.)
    """

    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_splits, send_splits = ctx.splits
        grad_in = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_in, None, None, None


class ExpertParallelMoE(MoELayer):
    """:class:`MoELayer` whose routed experts are split across a process group.

    Rank ``r`` of ``W`` processes holds experts ``r·E/W … (r+1)·E/W - 1``;
    the router and shared experts are replicated (synchronise their gradients
    as usual, e.g. with DDP or an all-reduce). Each rank routes its own
    tokens, sends every token to the rank owning its expert with one
    differentiable ``all_to_all_single`` (GShard, Lepikhin et al. 2021,
    Sec. 2.2), runs its local experts on tokens grouped by expert, and sends
    the results back with a second all-to-all. Outputs and gradients equal
    those of a single-process :class:`MoELayer` on the concatenated batch
    (router gradients summed over ranks). Local batches may differ in size
    and may be empty: a rank with no tokens still takes part in both
    all-to-alls (it sends nothing, runs its experts on what it receives and
    returns an empty output), so every rank must call ``forward`` and, on a
    loss that involves ``output``, ``backward`` (the backward pass runs the
    two all-to-alls again, also on a rank whose input needs no gradient). Auxiliary losses and ``tokens_per_expert``
    (shape (n_experts,), all experts) are computed on each rank's own
    tokens (0 on an empty rank); sum the counts over ranks for global ones.
    With auxiliary-loss-free balancing, :meth:`update_expert_bias`
    all-reduces the loads (a sum of counts, so ranks weigh by their tokens)
    and every rank applies the same update. Dropless only
    (``capacity_factor`` None or inf): a capacity would apply per rank.

    Parameters
    ----------
    config : MoEConfig
        ``n_experts`` must be divisible by the group size.
    group : ProcessGroup, optional
        Default: the world group. ``torch.distributed`` must be initialised.
    dtype : torch.dtype, optional

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is not initialised.
    ValueError
        If ``n_experts`` is not divisible by the group size, or the routing
        is not dropless token choice.
    """

    def __init__(self, config: MoEConfig, group=None, *, dtype: Optional[torch.dtype] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallelMoE needs torch.distributed; call torch.distributed.init_process_group first"
            )
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if config.n_experts % self.world:
            raise ValueError(
                f"n_experts={config.n_experts} is not divisible by the {self.world} processes; "
                f"choose a multiple of the group size"
            )
        if not config.dropless:
            raise ValueError(
                "ExpertParallelMoE is dropless token-choice routing only (expert choice and capacity limits "
                "would act per rank, not globally); set capacity_factor=None (or inf) and a token-choice router"
            )
        self.n_local = config.n_experts // self.world
        super().__init__(config, dtype=dtype)

    def build_experts(self, config: MoEConfig, dtype: Optional[torch.dtype]) -> Experts:
        """This rank's ``n_experts / world_size`` experts."""
        return Experts(
            config.n_experts // self.world, config.d_model, config.d_ff, config.expert, config.expert_activation, dtype,
            reuse_buffers=config.reuse_buffers, fused_elementwise=config.fused_elementwise,
        )

    @classmethod
    def from_layer(cls, layer: MoELayer, group=None) -> "ExpertParallelMoE":
        """Copy of ``layer`` holding this rank's slice of its experts (same router and shared experts)."""
        ep = cls(layer.config, group, dtype=layer.experts.w_in.dtype)
        lo = ep.rank * ep.n_local
        with torch.no_grad():
            ep.router.load_state_dict(layer.router.state_dict())
            ep.experts.w_in.copy_(layer.experts.w_in[lo : lo + ep.n_local])
            ep.experts.w_out.copy_(layer.experts.w_out[lo : lo + ep.n_local])
            if layer.shared_experts is not None:
                ep.shared_experts.load_state_dict(layer.shared_experts.state_dict())
        return ep

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """:meth:`MoELayer.forward` on this rank's tokens, with the group told of a bad input.

        If this rank's input is rejected (or routing fails) before the tokens are exchanged,
        the rank still joins the first collective with a failure flag and then raises its own
        error; every peer raises ``RuntimeError`` naming the failed rank(s) instead of waiting
        in the all-to-all until the process-group timeout. The group stays usable: every rank
        has run the same collectives, so the next ``forward`` works.

        Raises
        ------
        TypeError, ValueError
            This rank's input (see :meth:`MoELayer.check_input`).
        RuntimeError
            Another rank of the group failed before the exchange.
        """
        self._exchanged = False
        try:
            return super().forward(x, mask)
        except Exception:
            if not self._exchanged:  # the peers wait in the count exchange: tell them, then raise
                self._exchange_counts(torch.zeros(self.world, self.n_local, dtype=torch.long, device=self.experts.w_in.device), failed=True)
            raise

    def _exchange_counts(self, send_counts: torch.Tensor, failed: bool = False) -> torch.Tensor:
        """All-to-all of the token counts [dest rank, local expert] with a failure flag per rank."""
        self._exchanged = True
        flag = torch.full((self.world, 1), int(failed), dtype=send_counts.dtype, device=send_counts.device)
        send = torch.cat([send_counts, flag], 1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        bad = [r for r in range(self.world) if recv[r, -1] and r != self.rank]
        if bad and not failed:
            raise RuntimeError(
                f"rank(s) {bad} of the expert-parallel group failed before the token exchange (their own error "
                f"says why); this rank ({self.rank}) stops too instead of waiting for their tokens"
            )
        return recv[:, :-1]

    def global_expert_load(self, load: torch.Tensor) -> torch.Tensor:
        """``load`` summed over the process group (an all-reduce: every rank must call it)."""
        dist.all_reduce(load, group=self.group)
        return load

    def apply_experts(self, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """All-to-all tokens to their experts' ranks, run local experts, all-to-all back, combine."""
        world, n_local = self.world, self.n_local
        with torch.no_grad():
            send_counts = dispatch.counts.view(world, n_local)  # [dest rank, local expert]
            recv_counts = self._exchange_counts(send_counts).contiguous()  # [source rank, local expert]
            send_splits = send_counts.sum(1).tolist()
            recv_splits = recv_counts.sum(1).tolist()
            # received rows are ordered (source rank, local expert); regroup by local expert
            labels = torch.arange(n_local, device=x.device).repeat(world)
            labels = labels.repeat_interleave(recv_counts.reshape(-1))
            perm = torch.argsort(labels, stable=True)
            local_counts = recv_counts.sum(0).tolist()
        x_send = x.index_select(0, dispatch.token_idx)  # sorted by expert = grouped by destination rank
        if torch.is_grad_enabled() and not x_send.requires_grad:
            # the backward of this all-to-all is a collective too: join it even when this rank's x
            # needs no gradient (e.g. an empty batch that is a plain tensor), or the peers would hang
            x_send = x_send.detach().requires_grad_(True)
        x_recv = _AllToAll.apply(x_send, recv_splits, send_splits, self.group)
        # the fused gather -> experts -> scatter of the single-process layer (its workspace included), with
        # weight 1: row perm[a] of the result is expert e(a) applied to received row perm[a]
        ones = x_recv.new_ones(perm.shape[0])
        y_recv = self.experts.routed(x_recv, perm, ones, local_counts)
        y_sorted = _AllToAll.apply(y_recv, send_splits, recv_splits, self.group)
        return combine(y_sorted, dispatch, x.shape[0])
