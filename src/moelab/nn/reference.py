"""Deliberately naive reference of :class:`moelab.nn.MoELayer` (loops over tokens and experts).

For tests only: it recomputes the routing token by token from the layer's
parameters with the textbook formulas and applies every expert one token at a
time, so it shares no routing, dispatch or expert code with the fast path.
Slow; use a few dozen tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from moelab.activations import resolve_activation

__all__ = ["ReferenceOutput", "reference_forward"]


class ReferenceOutput(NamedTuple):
    """Output of :func:`reference_forward`: ``output`` (x.shape), ``tokens_per_expert`` (list), ``n_dropped``."""

    output: torch.Tensor
    tokens_per_expert: list
    n_dropped: int


def _expert(w_in: torch.Tensor, w_out: torch.Tensor, kind: str, act, x: torch.Tensor) -> torch.Tensor:
    """One expert on one token x of shape (d_model,)."""
    h = w_in @ x
    if kind == "swiglu":
        d_ff = w_out.shape[1]
        a = F.silu(h[:d_ff]) * h[d_ff:]
    else:
        a = act(h)
    return w_out @ a


def _token_choices(layer, x: torch.Tensor) -> list:
    """[(expert, weight), ...] in rank order for one token, by the textbook formulas."""
    cfg = layer.config
    router = layer.router
    pre = router.weight.float() @ x.float()
    bias = router.bias.float() if router.bias is not None else torch.zeros_like(pre)
    if cfg.router in ("dense_to_sparse", "activation_dense_to_sparse"):
        if cfg.router == "activation_dense_to_sparse":
            pre = resolve_activation(cfg.gate_activation)(pre)
        tau = router.temperature
        logits = pre / tau + bias
    else:
        logits = pre + bias
    if cfg.router == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
    else:
        e = torch.exp(logits - logits.max())
        scores = e / e.sum()
    select = scores.detach()
    if getattr(router, "expert_bias", None) is not None:  # DeepSeek-V3 Eq. (16): bias for selection only
        select = select + router.expert_bias
    ranked = sorted(range(cfg.n_experts), key=lambda i: -float(select[i]))[: cfg.top_k]
    choices = [(i, scores[i]) for i in ranked]
    if cfg.prune_threshold is not None:
        choices = [c for r, c in enumerate(choices) if r == 0 or float(c[1].detach()) >= cfg.prune_threshold]
    if cfg.normalize_weights:
        total = sum(w for _, w in choices)
        choices = [(i, w / total) for i, w in choices]
    return choices


def reference_forward(layer, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> ReferenceOutput:
    """Naive forward of ``layer`` (eval-mode routing: no noise).

    Parameters
    ----------
    layer : MoELayer
    x : Tensor of shape (..., d_model)
    mask : BoolTensor of shape x.shape[:-1], optional

    Returns
    -------
    ReferenceOutput

    Raises
    ------
    ValueError
        If the layer is in training mode with router noise (the reference
        has no noise).
    """
    cfg = layer.config
    if layer.training and cfg.noise is not None:
        raise ValueError("reference_forward has no router noise; call layer.eval() first")
    xf = x.reshape(-1, cfg.d_model)
    n_tokens = xf.shape[0]
    real = [t for t in range(n_tokens) if mask is None or bool(mask.reshape(-1)[t])]
    experts = layer.experts
    act = resolve_activation(cfg.expert_activation)

    assignments = []  # (token, expert, weight) in priority order
    if cfg.router == "expert_choice":
        probs = {}
        for t in real:
            logits = layer.router.weight.float() @ xf[t].float()
            if layer.router.bias is not None:
                logits = logits + layer.router.bias.float()
            probs[t] = torch.softmax(logits, dim=0)
        factor = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        cap = max(1, min(len(real), math.floor(factor * len(real) * cfg.top_k / cfg.n_experts)))
        for e in range(cfg.n_experts):
            chosen = sorted(real, key=lambda t: -float(probs[t][e].detach()))[:cap]
            assignments += [(t, e, probs[t][e]) for t in chosen]
        capacity = None
    else:
        per_token = {t: _token_choices(layer, xf[t]) for t in real}
        for rank in range(cfg.top_k):
            for t in real:
                if rank < len(per_token[t]):
                    e, w = per_token[t][rank]
                    assignments.append((t, e, w))
        capacity = (
            None
            if cfg.capacity_factor is None
            else math.ceil(cfg.capacity_factor * len(real) * cfg.top_k / cfg.n_experts)
        )

    used = [0] * cfg.n_experts
    n_dropped = 0
    rows = [xf.new_zeros(cfg.d_model) for _ in range(n_tokens)]
    for t, e, w in assignments:
        if capacity is not None and used[e] >= capacity:
            n_dropped += 1
            continue
        used[e] += 1
        y = _expert(experts.w_in[e], experts.w_out[e], cfg.expert, act, xf[t])
        rows[t] = rows[t] + w.to(y.dtype) * y
    if layer.shared_experts is not None:
        sh = layer.shared_experts
        for t in real:
            for s in range(sh.n):
                rows[t] = rows[t] + _expert(sh.w_in[s], sh.w_out[s], cfg.expert, act, xf[t])
    out = torch.stack(rows) if rows else xf.new_zeros(0, cfg.d_model)
    return ReferenceOutput(out.view(x.shape), used, n_dropped)
