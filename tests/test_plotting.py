"""fit.png (band + residual panel) and criteria.png figures (issue 15 items 3, 4)."""

import numpy as np
import pandas as pd
import pytest
import torch

from moelab import GaussianExperts, GaussianMoE, SoftmaxGate
from moelab.plotting import plot_criteria, plot_fit


def _model(d):
    gate = SoftmaxGate(torch.tensor([[3.0] * d, [0.0] * d], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    experts = GaussianExperts(torch.tensor([[1.0] * d, [-1.0] * d], dtype=torch.float64),
                              torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64))
    return GaussianMoE(gate, experts)


@pytest.mark.parametrize("d", [1, 2])
def test_plot_fit_has_band_gates_and_residual_panel(d):
    model = _model(d)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, d, generator=gen, dtype=torch.float64) * 2 - 1
    y = model.sample(x, gen)
    fig = plot_fit(model, x.numpy(), y.numpy(), level=0.9)
    top, middle, bottom = fig.axes
    assert any("90% prediction interval" in t.get_text() for t in top.get_legend().get_texts())
    share = float(bottom.get_title().split("%")[0])  # "NN% of samples inside their 90% interval"
    assert abs(share - 90) <= 5  # 400 draws from the model itself: sd 1.5 points
    label = bottom.get_ylabel() if d == 1 else bottom.get_xlabel()
    assert ("residual" in label) if d == 1 else ("predicted" in label)


def test_plot_fit_bad_level():
    with pytest.raises(ValueError, match="level must be a probability"):
        plot_fit(_model(1), np.zeros((3, 1)) + [[0.1], [0.2], [0.3]], np.array([0.0, 1.0, 2.0]), level=90)


def test_plot_criteria():
    tab = pd.DataFrame({"n_experts": [1, 2, 3], "bic": [3.0, 1.0, 2.0], "aic": [3.0, 1.0, 0.5],
                        "icl": [3.0, 1.5, 2.5], "degenerate": [False, False, True]})
    tab.attrs.update(criterion="bic", chosen=2)
    ax = plot_criteria(tab, criterion="bic").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == ["BIC (chooses K)", "AIC", "ICL"]
    assert "collapsed fit (not chosen)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.get_text() == "chosen K = 2" for t in ax.texts)
    with pytest.raises(ValueError, match="criterion must be bic, aic or icl"):
        plot_criteria(tab, criterion="cv")
    with pytest.raises(ValueError, match="lacks column"):
        plot_criteria(tab.drop(columns="icl"))
