"""The fast layer equals the naive loop (outputs and gradients) for every router."""

import pytest
import torch

from moelab.nn import reference_forward


ROUTERS = ["topk_softmax", "dense_to_sparse", "activation_dense_to_sparse", "sigmoid", "expert_choice"]
CASES = [dict(router=r) for r in ROUTERS] + [
    dict(router="topk_softmax", normalize_weights=True, router_bias=True),
    dict(router="dense_to_sparse", tau_max=3.0, tau_min=0.5, schedule="cosine", schedule_steps=4, top_k=4,
         prune_threshold=0.2, normalize_weights=True),
    dict(router="activation_dense_to_sparse", gate_activation="sigmoid", tau_max=0.7, tau_min=0.7, router_bias=True),
    dict(router="activation_dense_to_sparse", gate_activation=torch.sin, top_k=3),
    dict(router="sigmoid", normalize_weights=True, top_k=3),
    dict(router="topk_softmax", capacity_factor=0.6, n_shared_experts=2),
    dict(router="expert_choice", capacity_factor=1.5, top_k=1),
    dict(router="topk_softmax", expert="mlp", expert_activation="tanh", top_k=1),
]


def _run(layer, fn, x, grads):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = fn(layer, x)
    torch.manual_seed(99)
    (y * torch.randn(y.shape, dtype=y.dtype)).sum().backward()
    return y.detach(), grads(layer, x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in c.items()))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
def test_outputs_and_gradients_match_reference(case, masked, make_layer, grads):
    layer = make_layer(**case).eval()
    if layer.temperature is not None:
        layer.advance_schedule(2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[0, 3:] = False
        mask[2, 1] = False
    y_fast, g_fast = _run(layer, lambda m, t: m(t, mask).output, x, grads)
    y_ref, g_ref = _run(layer, lambda m, t: reference_forward(m, t, mask).output, x, grads)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    assert set(g_fast) == set(g_ref)
    for name in g_fast:
        if g_ref[name] is None:
            assert g_fast[name] is None, name
            continue
        assert g_fast[name] is not None, f"no gradient for {name}"
        assert g_fast[name].abs().sum() > 0 or g_ref[name].abs().sum() == 0
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    if masked:
        assert torch.all(y_fast[~mask] == 0)


@pytest.mark.parametrize("case", [c for c in CASES if "capacity_factor" in c], ids=str)
def test_counts_and_drops_match_reference(case, make_layer):
    layer = make_layer(**case).eval()
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = layer(x)
    ref = reference_forward(layer, x)
    assert out.tokens_per_expert.tolist() == ref.tokens_per_expert
    if layer.config.router != "expert_choice":
        assert out.n_dropped == ref.n_dropped
        assert out.n_dropped > 0  # the case is chosen so capacity binds
        assert out.fraction_dropped == pytest.approx(out.n_dropped / (24 * layer.config.top_k))
