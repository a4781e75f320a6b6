"""Auxiliary router losses (pure functions; ``MoELayer.forward`` returns them)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["load_balancing_loss", "router_z_loss"]


def load_balancing_loss(
    router_probs: torch.Tensor,
    expert_idx: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``N Σ_i f_i P_i``.

    Fedus, Zoph & Shazeer (JMLR 2022), Eqs. (4)–(6), without the
    coefficient α (multiply it in yourself):

    - ``f_i`` (Eq. 5): fraction of the router's (token, expert) assignments
      that go to expert ``i`` — for top-k routing, over all ``T·k`` choices;
      counted before any capacity drop;
    - ``P_i`` (Eq. 6): mean router probability of expert ``i`` over the real
      tokens;
    - loss (Eq. 4): ``N Σ_i f_i P_i``, equal to 1 under uniform routing.

    Only ``P`` carries a gradient.

    Parameters
    ----------
    router_probs : Tensor of shape (n_tokens, n_experts)
        Rows sum to one.
    expert_idx : LongTensor of shape (n_assign,)
        Expert of every assignment of a *real* token (padding excluded).
    mask : BoolTensor of shape (n_tokens,), optional
        True for real tokens; padding rows of ``router_probs`` are ignored.

    Returns
    -------
    Tensor of shape ()
        0 when there are no real tokens (an empty sum of ``router_probs``,
        so it stays in the autograd graph with a zero gradient).

    Raises
    ------
    ValueError
        If ``router_probs`` is not 2-D or ``mask`` has the wrong shape.
    """
    if router_probs.dim() != 2:
        raise ValueError(f"router_probs must have shape (n_tokens, n_experts), got {tuple(router_probs.shape)}")
    n_experts = router_probs.shape[1]
    if mask is not None:
        if mask.shape != router_probs.shape[:1]:
            raise ValueError(f"mask must have shape ({router_probs.shape[0]},), got {tuple(mask.shape)}")
        router_probs = router_probs[mask]
    if router_probs.shape[0] == 0 or expert_idx.numel() == 0:
        return router_probs[:0].sum()  # exactly 0, differentiable (zero gradient), never NaN
    counts = torch.bincount(expert_idx, minlength=n_experts).to(router_probs.dtype)
    f = counts / counts.sum()
    p = router_probs.mean(dim=0)
    return n_experts * torch.dot(f, p)


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss ``(1/B) Σ_x (logsumexp_i l_i(x))²``.

    Zoph et al. 2022 (ST-MoE), Eq. (5); penalises large router logits
    (coefficient to be multiplied in by the caller, 1e-3 in the paper).

    Parameters
    ----------
    logits : Tensor of shape (n_tokens, n_experts)
    mask : BoolTensor of shape (n_tokens,), optional
        True for real tokens; padding is ignored.

    Returns
    -------
    Tensor of shape ()
        0 when there are no real tokens (an empty sum of ``logits``, so it
        stays in the autograd graph with a zero gradient).

    Raises
    ------
    ValueError
        If ``logits`` is not 2-D or ``mask`` has the wrong shape.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (n_tokens, n_experts), got {tuple(logits.shape)}")
    if mask is not None:
        if mask.shape != logits.shape[:1]:
            raise ValueError(f"mask must have shape ({logits.shape[0]},), got {tuple(mask.shape)}")
        logits = logits[mask]
    if logits.shape[0] == 0:
        return logits[:0].sum()  # exactly 0, differentiable (zero gradient), never NaN
    return torch.logsumexp(logits, dim=-1).square().mean()
