import pytest
import torch

from tiny_models import ARCHS, save_hf_model

# Tiny models gain nothing from a second thread, and on a loaded 2-core machine the OpenMP
# barriers between two threads make small ops up to ~50x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny random checkpoint per architecture: {arch: path}."""
    return {arch: save_hf_model(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHS}


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    """Runs a test with 1 and with 2 torch threads (the native kernels split work between threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)
