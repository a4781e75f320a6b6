"""Dispatch bookkeeping: sort assignments by expert, apply capacity, combine back.

The bookkeeping (sort, counts, positions) runs under ``no_grad``; only the
weights carry gradients. No Python loop over tokens (MegaBlocks / ScatterMoE
style: one stable sort, one bincount).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

__all__ = ["Dispatch", "sort_by_expert", "token_capacity", "combine"]


class Dispatch(NamedTuple):
    """Assignments sorted by expert.

    Attributes
    ----------
    token_idx : LongTensor of shape (n_kept,)
        Token of each kept assignment, grouped by expert (expert 0 first) and,
        within an expert, in router priority order.
    weight : Tensor of shape (n_kept,)
        Matching combination weights (differentiable).
    counts : LongTensor of shape (n_experts,)
        Kept assignments per expert.
    counts_list : list of int
        ``counts`` as Python ints (split sizes).
    n_assigned : int
        Assignments before capacity drops.
    n_dropped : int
        Assignments dropped by the capacity limit (0 when dropless).
    """

    token_idx: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    counts_list: list
    n_assigned: int
    n_dropped: int


def token_capacity(capacity_factor: Optional[float], n_tokens: int, top_k: int, n_experts: int) -> Optional[int]:
    """Per-expert capacity ``ceil(capacity_factor * n_tokens * top_k / n_experts)``, or None (dropless).

    Source: Fedus et al. 2022 (Switch Transformer), Sec. 2.2, "expert
    capacity", generalised to top-k.

    Parameters
    ----------
    capacity_factor : float or None
        ``> 0``; ``None`` or ``math.inf`` mean no limit (dropless).
    n_tokens, top_k, n_experts : int
        Real tokens, experts per token, experts.

    Returns
    -------
    int or None
        None when dropless. A factor so large that the capacity is at least
        ``n_tokens`` (no expert can receive more, each token choosing an
        expert at most once) gives ``n_tokens``, so no float overflows.

    Raises
    ------
    ValueError
        If ``capacity_factor`` is NaN or ``<= 0`` (:class:`MoEConfig` checks
        this when the layer is built).
    """
    if capacity_factor is None or capacity_factor == math.inf:
        return None
    if not (capacity_factor > 0):
        raise ValueError(f"capacity_factor must be > 0, inf or None (dropless), got {capacity_factor!r}")
    capacity = capacity_factor * n_tokens * top_k / n_experts
    if capacity >= n_tokens:
        return n_tokens
    return math.ceil(capacity)


def sort_by_expert(
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    weight: torch.Tensor,
    n_experts: int,
    capacity: Optional[int] = None,
) -> Dispatch:
    """Group (token, expert, weight) assignments by expert, dropping those over capacity.

    Parameters
    ----------
    token_idx, expert_idx : LongTensor of shape (n_assign,)
        Assignments in priority order; when an expert is over capacity the
        later ones are dropped.
    weight : Tensor of shape (n_assign,)
    n_experts : int
    capacity : int or None
        Maximum assignments per expert; ``None`` keeps all (dropless).

    Returns
    -------
    Dispatch
    """
    with torch.no_grad():
        order = torch.argsort(expert_idx, stable=True)
        counts = torch.bincount(expert_idx, minlength=n_experts)
        n_assigned = int(expert_idx.numel())
        n_dropped = 0
        if capacity is not None:
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(n_assigned, device=expert_idx.device) - starts[expert_idx[order]]
            keep = position < capacity
            order = order[keep]
            kept = torch.clamp(counts, max=capacity)
            n_dropped = int((counts - kept).sum())
            counts = kept
        sorted_tokens = token_idx.index_select(0, order)
    # index_select, not weight[order]: its backward is an index_add, cheaper than advanced indexing's index_put
    return Dispatch(sorted_tokens, weight.index_select(0, order), counts, counts.tolist(), n_assigned, n_dropped)


def combine(y_sorted: torch.Tensor, dispatch: Dispatch, n_tokens: int) -> torch.Tensor:
    """Weighted sum of expert outputs back into token order.

    Parameters
    ----------
    y_sorted : Tensor of shape (n_kept, d_model)
        Expert outputs in dispatch order.
    dispatch : Dispatch
    n_tokens : int

    Returns
    -------
    Tensor of shape (n_tokens, d_model)
        ``out[t] = Σ_{assignments a of t} weight[a] * y_sorted[a]``; tokens
        with no kept assignment get 0.
    """
    weighted = y_sorted * dispatch.weight.to(y_sorted.dtype).unsqueeze(-1)
    out = y_sorted.new_zeros(n_tokens, y_sorted.shape[-1])
    return out.index_add(0, dispatch.token_idx, weighted)
