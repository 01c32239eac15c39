"""The DoRA formula, written once in plain torch: what every faster path of finlora's DoRA must compute.

With W0 the frozen base weight ([out, in], torch's layout), A and B the LoRA factors, s the scaling and m the
magnitude, DoRA's weight is

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_rows

and the layer computes y = x·W'ᵀ + b, the norm detached from the graph (DoRA paper, section 4.3), as peft does. The
norm never needs W0 + s·B·A: expanded over its rows i,

    ‖w_i‖² = ‖W0_i‖² + Σ_j B_ij·(2s·(A·W0ᵀ)_ji + s²·(B·A·Aᵀ)_ij)

from the frozen ‖W0_i‖², the skinny product A·W0ᵀ and the r × r Gram matrix A·Aᵀ (`gram_row_norm`, the form the cached
refresh and the Triton kernels compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def row_norm(w0: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """‖W0 + s·B·A‖ per output row, from the combined weight."""
    return torch.linalg.norm(w0 + scaling * lora_b @ lora_a, dim=1)


def dora_weight(w0: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scaling: float) -> Tensor:
    """W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_rows, the norm detached."""
    combined = w0 + scaling * lora_b @ lora_a
    return (magnitude / torch.linalg.norm(combined, dim=1).detach())[:, None] * combined


def dora_linear(x: Tensor, w0: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
                scaling: float) -> Tensor:
    """y = x·W'ᵀ + b (no dropout)."""
    return F.linear(x, dora_weight(w0, lora_a, lora_b, magnitude, scaling), bias)


def gram_row_norm(w2: Tensor, cross: Tensor, gram: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """‖W0 + s·B·A‖ per output row of L layers of one shape at once (float32, L × …), from their frozen ‖W0_i‖² (w2,
    L × d_out), A·W0ᵀ (cross, L × r × d_out), A·Aᵀ (gram, L × r × r) and B (L × d_out × r):
    ‖W0_i‖² + Σ_j B_ij·(2s·(W0Aᵀ)_ij + s²·(B·A·Aᵀ)_ij), clamped at 0 before the root."""
    t = torch.baddbmm(cross.transpose(1, 2), lora_b, gram, beta=2 * scaling, alpha=scaling**2)
    # Σ_j B_ij·t_ij elementwise, not as a batched GEMM of L·d_out products of r numbers each (slower on cuBLAS)
    return (lora_b * t).sum(-1).add_(w2).clamp_min_(0).sqrt_()
