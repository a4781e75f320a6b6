"""Grouped expert feed-forward on expert-sorted token blocks, with a hand-written backward.

One matmul per expert and direction, written straight into preallocated
buffers (``torch.mm(..., out=...)``): no concatenation of expert outputs, no
stacking of per-expert weight gradients, no split of the input gradient.
:func:`fused_moe_ffn` also fuses the gather of tokens and the weighted
scatter-add per expert; its SwiGLU forward computes, while ``h = [g, u]`` is
still in cache, the two factors of ``dL/dh = dL/da * [u silu'(g), silu(g)]``
(saved side by side instead of ``h``), so its backward is one element-wise
pass; and it keeps its saved intermediates, per-expert temporaries, weight
gradients and output in memory reused from call to call (:class:`Workspace`).
With ``fused_elementwise`` its SwiGLU forward and its two combines run as kernels
compiled by ``torch.compile`` (:mod:`moelab.nn.elementwise`), one pass each.
This keeps the layer close to the compute floor (the per-expert matmuls alone;
``benchmarks/nn_layer.py``). Differentiable once (no double backward).
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moelab.nn.elementwise import FusedKernels, kernels, resolve_fused_elementwise
from moelab.nn.workspace import Workspace

__all__ = ["grouped_ffn", "fused_moe_ffn", "Workspace"]


def _swiglu(h: torch.Tensor, d_ff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, silu(g)) for h = [g, u]: a = silu(g) * u, each of shape (n, d_ff)."""
    silu_g = F.silu(h[:, :d_ff])
    return silu_g * h[:, d_ff:], silu_g


def _swiglu_backward(
    h: torch.Tensor, silu_g: torch.Tensor, da: torch.Tensor, d_ff: int, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """dL/dh for a = silu(g) * u with h = [g, u]: [silu'(g) u da, silu(g) da] (3 element-wise passes).

    ``da`` (a buffer of the caller's) is overwritten with ``da * u``: no temporary is allocated.
    The result is written into ``out`` (shape of ``h``) when given.
    """
    dh = torch.empty_like(h) if out is None else out
    torch.mul(da, silu_g, out=dh[:, d_ff:])
    da.mul_(h[:, d_ff:])
    torch.ops.aten.silu_backward.grad_input(da, h[:, :d_ff], grad_input=dh[:, :d_ff])
    return dh



def _add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[index] += rows`` in place, for distinct ``index`` (one expert's tokens).

    Each element receives exactly one addition, so both kernels below give the same bits. With
    several intra-op threads ``index_put_(accumulate=True)`` runs as one parallel region, where
    ``index_add_`` (a ``scatter_add_`` on CPU) takes several; on a busy machine each region waits
    for a preempted thread (measured on 2 loaded cores, 4096 × 512: 104 ms against 12 ms; at one
    thread index_add_ is the faster, 0.18 ms against 0.30 ms).
    """
    if torch.get_num_threads() > 1:
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def _zero_unused_experts(bounds, n_experts, *grads):
    """Zero the weight-gradient rows of experts that received no tokens (in place on fresh buffers)."""
    used = {e for e, _, _ in bounds}
    for e in range(n_experts):
        if e not in used:
            for grad in grads:
                if grad is not None:
                    grad[e].zero_()

class _GroupedFFN(torch.autograd.Function):
    # Intermediates are kept per expert (one block of n_e rows each) rather than in one
    # (n, 2 d_ff) buffer: blocks stay below glibc's mmap threshold and are recycled by the
    # heap, whereas a fresh buffer of tens of MB is mmap-ed and page-faulted on every call,
    # which on CPU costs as much as a large share of the matmuls (measured: 1.5x slower).

    @staticmethod
    def forward(ctx, x, w_in, w_out, counts, kind, act):
        d_ff = w_out.shape[-1]
        y = x.new_empty(x.shape[0], w_out.shape[1])
        bounds, saved = [], []
        start = 0
        for e, c in enumerate(counts):
            a, b = start, start + c
            start = b
            if c == 0:
                continue
            h = torch.mm(x[a:b], w_in[e].t())
            if kind == "swiglu":
                act_h, silu_g = _swiglu(h, d_ff)
            else:
                act_h, silu_g = act(h), h.new_empty(0)
            torch.mm(act_h, w_out[e].t(), out=y[a:b])
            bounds.append((e, a, b))
            saved += [h, act_h, silu_g]
        ctx.save_for_backward(x, w_in, w_out, *saved)
        ctx.bounds, ctx.kind, ctx.act = bounds, kind, act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w_in, w_out, *saved = ctx.saved_tensors
        kind, act = ctx.kind, ctx.act
        need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        d_ff = w_out.shape[-1]
        dx = torch.empty_like(x) if need_x else None  # every row belongs to one expert block
        dw_in = torch.empty_like(w_in) if need_w_in else None
        dw_out = torch.empty_like(w_out) if need_w_out else None
        _zero_unused_experts(ctx.bounds, w_in.shape[0], dw_in, dw_out)
        for i, (e, a, b) in enumerate(ctx.bounds):
            h, act_h, silu_g = saved[3 * i : 3 * i + 3]
            if dw_out is not None:
                torch.mm(dy[a:b].t(), act_h, out=dw_out[e])
            if not (need_x or need_w_in):
                continue
            da = torch.mm(dy[a:b], w_out[e])
            if kind == "swiglu":
                dh = _swiglu_backward(h, silu_g, da, d_ff)
            else:
                with torch.enable_grad():
                    hh = h.detach().requires_grad_(True)
                    (dh,) = torch.autograd.grad(act(hh), hh, da)
            if dx is not None:
                torch.mm(dh, w_in[e], out=dx[a:b])
            if dw_in is not None:
                torch.mm(dh.t(), x[a:b], out=dw_in[e])
        return dx, dw_in, dw_out, None, None, None


def grouped_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    counts: Sequence[int],
    kind: str,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Expert ``e`` applied to the ``e``-th block of rows of ``x`` (differentiable once).

    Parameters
    ----------
    x : Tensor of shape (sum(counts), d_model)
        Tokens sorted by expert.
    w_in : Tensor of shape (n_experts, h_in, d_model)
        ``h_in = 2 d_ff`` (``[W_gate; W_up]``) for ``kind="swiglu"``, ``d_ff`` for ``"mlp"``.
    w_out : Tensor of shape (n_experts, d_model, d_ff)
    counts : sequence of int of length n_experts
    kind : {"swiglu", "mlp"}
    act : callable
        Element-wise activation of ``"mlp"`` experts (ignored for swiglu).

    Returns
    -------
    Tensor of shape (sum(counts), d_model)

    Raises
    ------
    ValueError
        If ``counts`` does not match ``x`` or ``w_in``.
    """
    counts = [int(c) for c in counts]
    if len(counts) != w_in.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(
            f"counts (len {len(counts)}, sum {sum(counts)}) must have one entry per expert ({w_in.shape[0]}) "
            f"and sum to the number of rows of x ({x.shape[0]})"
        )
    return _GroupedFFN.apply(x.contiguous(), w_in, w_out, counts, kind, act)


class _Scratch:
    """Per-expert temporaries of fixed widths, carved from one flat buffer (lent by a workspace or fresh)."""

    def __init__(self, workspace, max_rows, widths, like):
        # widths: the columns of each slot (max_rows rows), or (rows, columns) for a slot of other height
        self.workspace = workspace
        shapes = [w if isinstance(w, tuple) else (max_rows, w) for w in widths]
        numel = sum(r * w for r, w in shapes)
        flat, self.token = (None, None) if workspace is None else workspace.acquire_scratch(numel, like.dtype, like.device)
        self.flat = like.new_empty(numel) if flat is None else flat
        self.offsets, offset = [], 0
        for rows, width in shapes:
            self.offsets.append((offset, width))
            offset += rows * width

    def get(self, i, rows):
        """Slot ``i`` as a (rows, width) tensor."""
        offset, width = self.offsets[i]
        return self.flat[offset : offset + rows * width].view(rows, width)

    def release(self):
        if self.token is not None:
            self.workspace.release_scratch(self.token)
            self.token = None


def _combine_order(token_idx: torch.Tensor, n_tokens: int) -> Optional[torch.Tensor]:
    """Positions of each token's assignments, token by token, if every token has the same number k of them, else None.

    Then ``out[t] = Σ_j rows[order[k t + j]]`` is a gather and a sum over k, both parallel and
    without a zero-filled output, instead of a scatter-add (serial or sort-based on CPU).
    """
    n = token_idx.shape[0]
    if n_tokens == 0 or n == 0 or n % n_tokens:
        return None
    k = n // n_tokens
    if not bool((torch.bincount(token_idx, minlength=n_tokens) == k).all()):
        return None
    return torch.argsort(token_idx, stable=True)  # stable: a token's assignments in expert order


def _gather_sum(rows: torch.Tensor, order: torch.Tensor, out: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``out[t] = Σ_j rows[order[k t + j]]`` (k = len(order) / len(out)), summed in order j = 0, 1, ...."""
    k = order.shape[0] // out.shape[0]
    if k == 1:
        return torch.index_select(rows, 0, order, out=out)
    gathered = torch.index_select(rows, 0, order, out=buffer)
    return torch.sum(gathered.view(out.shape[0], k, out.shape[1]), 1, out=out)


def _returned(workspace, name, shape, like):
    """Uninitialised tensor of ``shape`` handed to the caller, from ``workspace`` when given (Workspace.returned)."""
    if workspace is None:
        return like.new_empty(shape)
    return workspace.returned(name, shape, like.dtype, like.device)


class _FusedMoEFFN(torch.autograd.Function):
    # gather → expert FFN → weighted scatter-add, one expert at a time: every intermediate is
    # one expert's block (see the note on _GroupedFFN), and nothing of size (n_assign, d) is built.

    @staticmethod
    def forward(ctx, x, token_idx, weight, w_in, w_out, counts, kind, act, workspace, track, fused):
        d_model, h_in, d_ff, d_out = x.shape[1], w_in.shape[1], w_out.shape[-1], w_out.shape[1]
        swiglu = kind == "swiglu"
        # the output: memory of an earlier call's output that nobody refers to any more (Workspace.returned)
        out = _returned(workspace, "out", (x.shape[0], d_out), x)
        n_assign = token_idx.shape[0]
        # combine by a gather and a sum when every token has k assignments: with the fused kernels (one
        # pass, no zero fill), or eagerly with several intra-op threads (parallel; a CPU scatter-add is
        # serial or sorts, and each of its parallel regions waits for a preempted thread on a busy machine:
        # 2 threads, 2 loaded cores, 2.10 -> 1.37-1.76 x the floor); eagerly at one thread the per-expert
        # scatter-add into a zeroed output is the faster (1.15 against 1.17)
        order = _combine_order(token_idx, x.shape[0]) if fused is not None or torch.get_num_threads() > 1 else None
        if order is None:
            out.zero_()
        w = weight.to(x.dtype)
        # saved for backward, per row: x_e, the expert's hidden pre-activation h (mlp) or, for swiglu,
        # [u silu'(g), silu(g)] (the factors of dL/dh = dL/da * [u silu'(g), silu(g)]), and act_h, y_e;
        # from the workspace when it is free
        per_row = d_model + d_out + (3 * d_ff if swiglu else h_in + d_ff)
        flat, token = (None, None) if workspace is None or not track else workspace.acquire(
            sum(counts) * per_row, x.dtype, x.device)
        offset = 0

        def block(rows, cols):
            nonlocal offset
            if flat is None:
                return x.new_empty(rows, cols)
            view = flat[offset : offset + rows * cols].view(rows, cols)
            offset += rows * cols
            return view

        # one expert's temporaries: h = [g, u] (swiglu; not saved: the matmul writes it to memory still in
        # cache), the weighted expert output, and without a graph the swiglu factors and act_h
        unsaved = swiglu and not track
        # the weighted expert outputs of all assignments and their gathered copy, for the eager combine by
        # gather; the fused combine reads the unweighted outputs (saved, or in the first of these slots)
        rows = n_assign if order is not None else 0
        scratch = _Scratch(workspace, max(counts, default=0),
                           [h_in if swiglu else 0, d_out, d_ff if unsaved and fused is None else 0,
                            d_ff if unsaved else 0, (rows if fused is None or not track else 0, d_out),
                            (rows if fused is None else 0, d_out)], x)
        # the expert outputs of all assignments, one block per expert (saved; or the fused combine's input)
        ys = block(n_assign, d_out) if track else (scratch.get(4, n_assign) if rows and fused is not None else None)
        bounds, saved = [], []
        start = 0
        for e, c in enumerate(counts):
            a, b = start, start + c
            start = b
            if c == 0:
                continue
            xe = torch.index_select(x, 0, token_idx[a:b], out=block(c, d_model))
            if swiglu:
                h = torch.mm(xe, w_in[e].t(), out=scratch.get(0, c))
                g, u = h[:, :d_ff], h[:, d_ff:]
                if track:  # act_h and the factors [u silu'(g), silu(g)], computed now while h is in cache
                    hidden = block(c, 2 * d_ff).view(c, 2, d_ff)
                    act_h = block(c, d_ff)
                    if fused is not None:
                        fused.swiglu_forward(g, u, act_h, hidden[:, 0], hidden[:, 1])
                    else:
                        silu_g = torch.ops.aten.silu.out(g, out=hidden[:, 1])
                        torch.mul(silu_g, u, out=act_h)
                        torch.ops.aten.silu_backward.grad_input(u, g, grad_input=hidden[:, 0])
                else:
                    hidden, act_h = None, scratch.get(3, c)
                    if fused is not None:
                        fused.swiglu(g, u, act_h)
                    else:
                        torch.mul(torch.ops.aten.silu.out(g, out=scratch.get(2, c)), u, out=act_h)
            else:
                hidden = torch.mm(xe, w_in[e].t(), out=block(c, h_in))
                act_h = act(hidden)
            ye = torch.mm(act_h, w_out[e].t(), out=ys[a:b] if ys is not None else block(c, d_out))
            if order is None:
                _add_rows(out, token_idx[a:b], torch.mul(ye, w[a:b, None], out=scratch.get(1, c)))
            elif fused is None:
                torch.mul(ye, w[a:b, None], out=scratch.get(4, n_assign)[a:b])
            bounds.append((e, a, b))
            if track:
                saved += [xe, hidden, act_h, ye]
        if order is not None:
            if fused is not None:
                fused.sum_rows(ys, order, w, out)
            else:
                _gather_sum(scratch.get(4, n_assign), order, out, scratch.get(5, n_assign))
        scratch.release()
        ctx.order = order
        ctx.save_for_backward(token_idx, w, w_in, w_out, *saved)
        ctx.bounds, ctx.kind, ctx.act, ctx.fused = bounds, kind, act, fused
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        ctx.workspace, ctx.release = workspace, None
        if token is not None:  # lent until the end of backward, or until the graph is freed without one
            ctx.release = weakref.finalize(ctx, workspace.release, token)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        token_idx, w, w_in, w_out, *saved = ctx.saved_tensors
        kind, act, ws, fused = ctx.kind, ctx.act, ctx.workspace, ctx.fused
        need_x, _, need_weight, need_w_in, need_w_out = ctx.needs_input_grad[:5]
        d_model, h_in, d_ff, d_out = ctx.x_shape[1], w_in.shape[1], w_out.shape[-1], w_out.shape[1]
        # the weights' gradients come from reused memory when nobody holds the previous call's
        # (Workspace.gradient); the input's is fresh: autograd adds the router's gradient of x into it
        # in place only if nothing else refers to its memory
        order = ctx.order
        dx = (dout.new_zeros(ctx.x_shape) if order is None else dout.new_empty(ctx.x_shape)) if need_x else None
        dweight = w.new_zeros(w.shape[0]) if need_weight else None
        dw_in = _returned(ws, "w_in", w_in.shape, w_in) if need_w_in else None
        dw_out = _returned(ws, "w_out", w_out.shape, w_out) if need_w_out else None
        _zero_unused_experts(ctx.bounds, w_in.shape[0], dw_in, dw_out)
        # one expert's temporaries at a time: dy, dy * ye, dL/d act_h, dL/dh, dL/dx_e
        max_rows = max((b - a for _, a, b in ctx.bounds), default=0)
        n_assign = token_idx.shape[0] if order is not None and need_x else 0  # dL/dx_e of all assignments
        scratch = _Scratch(ws, max_rows, [d_out, d_out, d_ff, h_in if kind == "swiglu" else 0, d_model,
                                          (n_assign, d_model), (n_assign if fused is None else 0, d_model)], dout)
        for i, (e, a, b) in enumerate(ctx.bounds):
            xe, hidden, act_h, ye = saved[4 * i : 4 * i + 4]
            tok, c = token_idx[a:b], b - a
            dy = torch.index_select(dout, 0, tok, out=scratch.get(0, c))  # [n_e, d]
            if dweight is not None:
                torch.sum(torch.mul(dy, ye, out=scratch.get(1, c)), -1, out=dweight[a:b])
            dy.mul_(w[a:b, None])
            if dw_out is not None:
                torch.mm(dy.t(), act_h, out=dw_out[e])
            if not (need_x or need_w_in):
                continue
            da = torch.mm(dy, w_out[e], out=scratch.get(2, c))
            if kind == "swiglu":  # dL/dh = dL/da * [u silu'(g), silu(g)]: one pass
                dh = scratch.get(3, c)
                torch.mul(da[:, None, :], hidden, out=dh.view(c, 2, d_ff))
            else:
                with torch.enable_grad():
                    hh = hidden.detach().requires_grad_(True)
                    (dh,) = torch.autograd.grad(act(hh), hh, da)
            if dw_in is not None:
                torch.mm(dh.t(), xe, out=dw_in[e])
            if dx is not None:
                if order is None:
                    _add_rows(dx, tok, torch.mm(dh, w_in[e], out=scratch.get(4, c)))
                else:
                    torch.mm(dh, w_in[e], out=scratch.get(5, n_assign)[a:b])
        if dx is not None and order is not None:
            if fused is not None:
                fused.gather_sum(scratch.get(5, n_assign), order, dx)
            else:
                _gather_sum(scratch.get(5, n_assign), order, dx, scratch.get(6, n_assign))
        scratch.release()
        if dweight is not None:
            dweight = dweight.to(ctx.weight_dtype)
        if ctx.release is not None:
            ctx.release()  # the saved intermediates are used up: the workspace may be lent again
        return dx, None, dweight, dw_in, dw_out, None, None, None, None, None, None


def fused_moe_ffn(
    x: torch.Tensor,
    token_idx: torch.Tensor,
    weight: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    counts: Sequence[int],
    kind: str,
    act: Callable[[torch.Tensor], torch.Tensor],
    workspace: Optional[Workspace] = None,
    fused_elementwise: Union[str, bool] = False,
) -> torch.Tensor:
    """``out[t] = Σ_{a: token_idx[a]=t} weight[a] f_{e(a)}(x[t])`` for expert-sorted assignments (differentiable once).

    Equal to ``combine(grouped_ffn(x[token_idx], ...), ...)`` but fused per
    expert, so no (n_assign, d_model) intermediate is materialised.

    Parameters
    ----------
    x : Tensor of shape (n_tokens, d_model)
    token_idx : LongTensor of shape (n_assign,)
        Token of each assignment, grouped by expert (``counts[e]`` rows for expert ``e``).
    weight : Tensor of shape (n_assign,)
        Combination weight of each assignment (any float dtype; its gradient has the same dtype).
    w_in, w_out, counts, kind, act
        As in :func:`grouped_ffn`.
    workspace : Workspace, optional
        Reused memory for the intermediates saved for backward (:class:`Workspace`);
        None allocates them afresh on every call.
    fused_elementwise : {False, "auto", True}, default False
        Run the element-wise work between the matmuls (the SwiGLU forward with the factors of its
        derivative; the weighted combine of the outputs and of the input gradient) as kernels
        compiled by ``torch.compile``
        (:mod:`moelab.nn.elementwise`). ``"auto"``: on CPU for float32 / bfloat16 calls of at least
        :data:`~moelab.nn.elementwise.AUTO_MIN_ELEMENTS` assignments × d_ff; ``True``: always;
        ``False``: never (see :class:`~moelab.nn.MoEConfig` for why that is the default). If compiling fails the call runs eagerly (reported once per process:
        a ``RuntimeWarning`` for True, a ``moelab.nn`` log record for "auto"). Outputs and gradients
        agree with the eager path to rounding.

    Returns
    -------
    Tensor of shape (n_tokens, d_model)

    Raises
    ------
    ValueError
        If ``counts`` does not match ``token_idx`` or ``w_in``, or ``weight`` and ``token_idx`` differ in length.
    TypeError
        If ``fused_elementwise`` is not "auto", True or False.
    """
    counts = [int(c) for c in counts]
    if len(counts) != w_in.shape[0] or sum(counts) != token_idx.shape[0]:
        raise ValueError(
            f"counts (len {len(counts)}, sum {sum(counts)}) must have one entry per expert ({w_in.shape[0]}) "
            f"and sum to the number of assignments ({token_idx.shape[0]})"
        )
    if weight.shape != token_idx.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {tuple(token_idx.shape)}")
    setting = resolve_fused_elementwise(fused_elementwise)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, w_in, w_out))
    fused = None
    if setting is not False and token_idx.shape[0]:
        k = max(1, token_idx.shape[0] // max(1, x.shape[0]))
        fused = kernels.select(setting, x.dtype, x.device, token_idx.shape[0] * w_out.shape[-1],
                               check=lambda f: _check_fused(f, x.dtype, x.device, k))
    return _FusedMoEFFN.apply(x.contiguous(), token_idx, weight, w_in, w_out, counts, kind, act, workspace, track, fused)


def _check_fused(fused: FusedKernels, dtype: torch.dtype, device: torch.device, k: int) -> None:
    """Forward + backward of a small problem with ``fused`` against the eager path; raises if they differ.

    Runs (and so compiles) every kernel through the views the layer passes them, at sizes that
    are all distinct and at least 2 (dynamo would otherwise specialise the graphs to equal or
    unit sizes and compile again for the real ones).
    """
    n_tokens, d_model, d_ff, n_experts = 7, 10, 11, 3
    n_assign = k * n_tokens
    counts = [2, 3, n_assign - 5]  # n_assign >= 7
    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=dtype, device=device)
    token_idx = torch.randperm(n_assign, generator=gen).to(device) % n_tokens
    inputs = [torch.randn(n_tokens, d_model, generator=gen).to(**kw), torch.rand(n_assign, generator=gen).to(**kw),
              (torch.randn(n_experts, 2 * d_ff, d_model, generator=gen) / d_model**0.5).to(**kw),
              (torch.randn(n_experts, d_model, d_ff, generator=gen) / d_ff**0.5).to(**kw)]
    dout = torch.randn(n_tokens, d_model, generator=gen).to(**kw)
    results = []
    with torch.inference_mode(False), torch.enable_grad():
        for kernels_used in (fused, None):
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            x, weight, w_in, w_out = leaves
            out = _FusedMoEFFN.apply(x, token_idx, weight, w_in, w_out, counts, "swiglu", F.silu, Workspace(), True,
                                     kernels_used)
            with torch.no_grad():  # the forward without a graph (kernel "swiglu")
                plain = _FusedMoEFFN.apply(*inputs[:1], token_idx, *inputs[1:], counts, "swiglu", F.silu, Workspace(),
                                           False, kernels_used)
            results.append([out.detach(), plain, *torch.autograd.grad(out, leaves, dout)])
    low = dtype in (torch.bfloat16, torch.float16)  # the eager path rounds after every op, the kernels once
    for got, ref in zip(*results):
        scale = float(ref.abs().max()) if low else 0.0
        torch.testing.assert_close(got, ref, **(dict(rtol=0.0, atol=0.05 * scale) if low else {}))
