"""Experts with stacked weights of shape (n_experts, out, in)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from moelab.activations import resolve_activation
from moelab.nn.elementwise import resolve_fused_elementwise
from moelab.nn.grouped import Workspace, fused_moe_ffn, grouped_ffn

__all__ = ["Experts"]


class Experts(nn.Module):
    """A bank of ``n`` feed-forward experts with stacked weights.

    - ``"swiglu"``: ``f_e(x) = W_out[e] (silu(W_gate x) * (W_up x))`` where
      ``W_in[e] = [W_gate; W_up]`` (Shazeer 2020, "GLU variants", Eq. (6);
      the Mixtral expert).
    - ``"mlp"``: ``f_e(x) = W_out[e] act(W_in[e] x)``.

    Parameters
    ----------
    n : int
        Number of experts.
    d_model, d_ff : int
        Input/output width and hidden width.
    kind : {"swiglu", "mlp"}, default "swiglu"
    activation : str or callable, default "gelu"
        Activation of ``"mlp"`` experts (:func:`moelab.activations.resolve_activation`).
    dtype : torch.dtype, optional
    reuse_buffers : bool, default True
        Keep what :meth:`routed` allocates (saved intermediates, backward temporaries, weight
        gradients, output) in a :class:`~moelab.nn.grouped.Workspace` reused from call to call (no
        page faults on CPU; costs one forward's intermediates, one set of gradients and one output of
        memory; a gradient or output is reused only once nothing refers to it).
    fused_elementwise : {False, "auto", True}, default False
        Run :meth:`routed`'s element-wise work (the SwiGLU forward with its derivative's factors, the
        weighted combine of the outputs and of the input gradient) as kernels compiled by
        ``torch.compile`` (:mod:`moelab.nn.elementwise`; see :func:`~moelab.nn.grouped.fused_moe_ffn`
        and :class:`~moelab.nn.MoEConfig`).

    Attributes
    ----------
    w_in : Parameter of shape (n, 2 * d_ff, d_model) for swiglu, (n, d_ff, d_model) for mlp
    w_out : Parameter of shape (n, d_model, d_ff)
    workspace : Workspace or None
        None when ``reuse_buffers=False``.
    fused_elementwise : {False, "auto", True}
        May be changed after construction.
    """

    def __init__(
        self,
        n: int,
        d_model: int,
        d_ff: int,
        kind: str = "swiglu",
        activation: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "gelu",
        dtype: Optional[torch.dtype] = None,
        reuse_buffers: bool = True,
        fused_elementwise: Union[str, bool] = False,
    ) -> None:
        super().__init__()
        self.workspace = Workspace() if reuse_buffers else None
        self.fused_elementwise = resolve_fused_elementwise(fused_elementwise)
        if kind not in ("swiglu", "mlp"):
            raise ValueError(f"unknown expert kind {kind!r}; choose 'swiglu' or 'mlp'")
        self.n, self.d_model, self.d_ff, self.kind = n, d_model, d_ff, kind
        self.act = F.silu if kind == "swiglu" else resolve_activation(activation)
        h_in = 2 * d_ff if kind == "swiglu" else d_ff
        self.w_in = nn.Parameter(torch.empty(n, h_in, d_model, dtype=dtype))
        self.w_out = nn.Parameter(torch.empty(n, d_model, d_ff, dtype=dtype))
        nn.init.uniform_(self.w_in, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(d_ff), 1 / math.sqrt(d_ff))

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Expert non-linearity applied to ``x W_inᵀ`` of shape (..., h_in); returns (..., d_ff)."""
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x_sorted: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Run expert ``e`` on the ``e``-th contiguous block of ``x_sorted`` (:func:`moelab.nn.grouped.grouped_ffn`).

        Parameters
        ----------
        x_sorted : Tensor of shape (sum(counts), d_model)
            Tokens grouped by expert.
        counts : sequence of int of length n
            Block sizes.

        Returns
        -------
        Tensor of shape (sum(counts), d_model)
        """
        if len(counts) != self.n:
            raise ValueError(f"counts has {len(counts)} entries, expected one per expert ({self.n})")
        return grouped_ffn(x_sorted, self.w_in, self.w_out, counts, self.kind, self.act)

    def routed(
        self, x: torch.Tensor, token_idx: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]
    ) -> torch.Tensor:
        """Weighted sum of the experts' outputs per token (gather, experts, combine fused per expert).

        Parameters
        ----------
        x : Tensor of shape (n_tokens, d_model)
        token_idx : LongTensor of shape (n_assign,)
            Tokens grouped by expert, ``counts[e]`` of them for expert ``e``.
        weight : Tensor of shape (n_assign,)
        counts : sequence of int of length n

        Returns
        -------
        Tensor of shape (n_tokens, d_model): ``Σ_a weight[a] f_{e(a)}(x[token_idx[a]])``
        accumulated at ``token_idx[a]`` (:func:`moelab.nn.grouped.fused_moe_ffn`).
        """
        return fused_moe_ffn(x, token_idx, weight, self.w_in, self.w_out, counts, self.kind, self.act, self.workspace,
                             self.fused_elementwise)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of all experts applied to every token (shared experts).

        Parameters
        ----------
        x : Tensor of shape (n_tokens, d_model)

        Returns
        -------
        Tensor of shape (n_tokens, d_model): ``Σ_e f_e(x)``.
        """
        h = F.linear(x, self.w_in.reshape(-1, self.d_model))  # [T, n * h_in]
        a = self.hidden(h.view(x.shape[0], self.n, self.w_in.shape[1]))  # [T, n, d_ff]; explicit sizes: T may be 0
        w_out = self.w_out.permute(1, 0, 2).reshape(self.d_model, self.n * self.d_ff)
        return F.linear(a.reshape(x.shape[0], self.n * self.d_ff), w_out)
