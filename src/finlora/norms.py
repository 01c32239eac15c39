"""A model's RMSNorms as torch's fused kernel, on CUDA.

transformers' Llama-style RMSNorm normalizes a float32 copy of its input, and autograd keeps that copy for backward:
twice the bf16 activation it normalizes, in each layer that gradient checkpointing recomputes (two norms) and in the
final norm, a large part of a quantized model's peak (docs/benchmarks.md). On CUDA, `torch.nn.functional.rms_norm`
runs one kernel that keeps the input as it is and one float32 scale per row, computing in float32 inside; outside
autocast, which would hand it a float32 copy. On the CPU the same call is a composite that keeps more float32 copies
than transformers' norm, so the CPU keeps transformers' norm.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class FusedRMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x²) + eps)` over the last axis, in float32 inside one kernel, returning the dtype
    transformers' norm returns (the promotion of input's and weight's). Holds the replaced norm's own weight."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.to(dtype), self.weight.shape, self.weight.to(dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace each RMSNorm of `model` (a module so named, with a 1-D weight and an epsilon) by a `FusedRMSNorm`
    holding its weight, where a probe input gives the norm's own output: a norm of other arithmetic (Gemma's
    `1 + weight`) keeps its forward. The state dict keeps its keys. Returns the number of norms replaced."""
    fused, kept = 0, []
    for name, module in list(model.named_modules()):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.ndim == 1
                and weight.is_floating_point() and isinstance(eps, float)):
            continue
        replacement = FusedRMSNorm(weight, eps)
        if not _same_output(module, replacement):
            kept.append(type(module).__name__)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        fused += 1
    if kept:
        log.info("RMSNorm: %d norms of other arithmetic keep their own forward (%s)", len(kept), sorted(set(kept)))
    return fused


def _same_output(own: nn.Module, fused: FusedRMSNorm) -> bool:
    weight = fused.weight
    generator = torch.Generator(weight.device).manual_seed(0)
    probe = torch.randn(4, weight.shape[0], generator=generator, device=weight.device).to(weight.dtype)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        expected, got = own(probe), fused(probe)
    tolerance = 2 * torch.finfo(expected.dtype).eps if expected.dtype.itemsize < 4 else 1e-5
    return got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), rtol=tolerance,
                                                          atol=tolerance * expected.abs().max().item())
