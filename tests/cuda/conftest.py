"""GPU tests: each module skips itself where no CUDA device is present (CI).

fp32 dots inside Triton kernels default to tf32; these tests pin them to full fp32 (also inside
fla's chunked kernel) so that fp32 checks measure the algorithms, not tf32 rounding.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

NOTES: list[str] = []  # measured errors, printed after the run (what reports quote)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture
def check():
    def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        err = rel_err(out, ref)
        NOTES.append(f"{name}: {err:.2e} (tol {tol:.0e})")
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return check


@pytest.fixture
def note():
    return NOTES.append


def pytest_terminal_summary(terminalreporter):
    if NOTES:
        terminalreporter.write_line("measured (relative errors against the torch reference on the CPU):")
        for line in NOTES:
            terminalreporter.write_line("  " + line)
