"""Float comparisons that do not depend on the CPU's reduction order.

Two processes (or two CPUs, or two thread counts) sum the same terms in another order; the result then
differs by a few ulps of the *largest partial sum*, not of the result. An absolute tolerance fails on
large values (a DDP gradient of ~900 differs in the 4th decimal on an AMD EPYC) and is meaningless on
tiny ones, so the tolerance scales with the magnitude compared: `rel` times the largest |value| of the
reference tensor (at least `floor`, for tensors that are all near zero).
"""
from __future__ import annotations

import torch


def scaled_atol(want: torch.Tensor, rel: float = 1e-5, floor: float = 1e-6) -> float:
    return max(floor, rel * float(want.detach().abs().max()) if want.numel() else 0.0)


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, floor: float = 1e-6) -> bool:
    """|got - want| <= rel * max|want| (and <= floor near zero) everywhere; shapes must match."""
    got, want = got.detach().float(), want.detach().float()
    return got.shape == want.shape and bool(((got - want).abs() <= scaled_atol(want, rel, floor)).all())


def gap(got: torch.Tensor, want: torch.Tensor) -> str:
    """The assertion message: largest difference against the magnitude it is relative to."""
    d = (got.detach().float() - want.detach().float()).abs().max()
    return f"max |diff| {float(d):.3g} at max |want| {float(want.detach().abs().max()):.3g}"
