"""The digits example trains (short run): far above chance, schedule at its floor, utilisation reported."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_moe.py"


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("moelab_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gate", ["topk_softmax", "dense_to_sparse"])
def test_short_training_run(example, gate):
    data = example.load_data(seed=0)
    result = example.run_gate(gate, example.GATES[gate], data, epochs=3, seed=0)
    assert result["test_accuracy"] > 0.6  # chance is 0.1
    assert sum(result["expert_share"]) == pytest.approx(1.0, abs=1e-2)
    assert 0.0 < result["utilisation_entropy"] <= 1.0
    if gate == "dense_to_sparse":
        assert result["final_temperature"] == pytest.approx(0.25)
