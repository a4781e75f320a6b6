import textwrap

import pytest

TINY = textwrap.dedent(
    """
    [study]
    name = "tiny"
    seed = 1
    replicates = 3
    n = [80, 160]
    x_points = 16

    [truth]
    x = { distribution = "uniform", low = 0.0, high = 1.0 }
    [truth.gate]
    family = "softmax"
    slope = [[25.0], [0.0]]
    intercept = [-8.0, 0.0]
    [truth.experts]
    slope = [[-20.0], [20.0]]
    intercept = [15.0, -5.0]
    sd = [0.3, 0.4]

    [[fit]]
    name = "exact"
    n_experts = 2
    max_iter = 20
    tol = 1e-6

    [[fit]]
    name = "over"
    n_experts = 3
    max_iter = 20
    tol = 1e-6
    """
)


@pytest.fixture
def tiny_toml(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p
