import pytest

from tiny_models import ARCHS, save_hf_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny random checkpoint per architecture: {arch: path}."""
    return {arch: save_hf_model(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHS}
