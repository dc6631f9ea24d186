import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; elsewhere they are skipped with the reason, never silently dropped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """Small synthetic datasets in the layout the embedded stage configs read (tests/stages.py)."""
    from tests.stages import build_embedded_data

    return build_embedded_data(tmp_path_factory.mktemp("embedded-data"))
