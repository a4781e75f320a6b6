import pathlib

import pandas as pd
import pytest
import torch

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def oracle_loglik():
    return pd.read_csv(DATA / "softmax_gaussian_moe_loglik.csv")


@pytest.fixture(scope="session")
def oracle_params():
    return pd.read_csv(DATA / "softmax_gaussian_moe_params.csv")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors run faster on one intra-op thread; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _moelab_cache_dir(tmp_path_factory):
    """compile="auto" markers (moelab.autocompile) go to a temporary directory, not the user's cache."""
    import os

    before = os.environ.get("MOELAB_CACHE_DIR")
    os.environ["MOELAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("moelab-cache"))
    yield
    if before is None:
        os.environ.pop("MOELAB_CACHE_DIR", None)
    else:
        os.environ["MOELAB_CACHE_DIR"] = before
