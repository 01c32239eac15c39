"""finlora's DoRA Triton kernels and their launchers, each launcher with the torch ops it runs instead off CUDA (or
with `use_triton` off). The kernels compute what `finlora.dora.reference` writes in plain torch; tests/test_dora.py
checks each against the torch path on a GPU.

- `dora_out`: y = scale ⊙ result + (1 - scale) ⊙ b + ax·b_effᵀ, the LoRA branch's product and the scaled base
  output in one pass (`_dora_out_kernel`).
- `dora_grads`: g·scale with B's and m's gradients in one pass over g, y and ax (`_dora_grad_kernel`), its per-block
  partial sums added up in a fixed order (`_sum_rows_kernel`); m's gradient is Σ_tokens g·(y - b) / m.
- `grouped_a_w0t`: A·W0ᵀ of every layer of one shape in one launch, each W0 read where it lies (`_a_w0t_kernel`).
- `layer_norm_consts`: one layer's norm, scale and branch weights from its A·W0ᵀ and A·Aᵀ (`_dora_norm_kernel`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch ship without Triton
    triton = None

if triton is not None:

    @triton.jit
    def _dora_out_kernel(res_ptr, ax_ptr, b_ptr, scale_ptr, bias_ptr, y_ptr, n_rows, n_cols, r, HAS_BIAS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
        """y = ax·b_effᵀ + scale ⊙ result (+ (1 - scale) ⊙ bias), in float32, rounded once: the LoRA branch's
        product and the scaled base output in one pass."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, R)
        row_mask, col_mask = rows < n_rows, cols < n_cols
        a = tl.load(ax_ptr + rows[:, None].to(tl.int64) * r + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < r),
                    other=0.0)
        b = tl.load(b_ptr + cols[None, :] * r + ks[:, None], mask=col_mask[None, :] & (ks[:, None] < r), other=0.0)
        acc = tl.dot(a, b)
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            acc += ((1 - scale) * tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _a_w0t_kernel(w_table, a_ptr, out_ptr, r, d_in, d_out, W_DTYPE: tl.constexpr, R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[l] = A[l]·W0[l]ᵀ in float32, A cast to W0's dtype first (as `bases.a_times_w0t`), each layer's W0 read
        where it lies: its address is w_table[l]. One program a layer and BLOCK_N outputs."""
        layer = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, R)
        w_ptr = tl.load(w_table + layer).to(tl.pointer_type(W_DTYPE))
        a_base = a_ptr + layer.to(tl.int64) * r * d_in
        acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_base + rows[:, None] * d_in + ks[None, :], mask=(rows[:, None] < r) & (ks[None, :] < d_in),
                        other=0.0)
            w = tl.load(w_ptr + cols[None, :].to(tl.int64) * d_in + ks[:, None],
                        mask=(cols[None, :] < d_out) & (ks[:, None] < d_in), other=0.0)
            acc = tl.dot(a.to(W_DTYPE), w, acc)
        out = out_ptr + layer.to(tl.int64) * r * d_out + rows[:, None] * d_out + cols[None, :]
        tl.store(out, acc, mask=(rows[:, None] < r) & (cols[None, :] < d_out))

    @triton.jit
    def _dora_norm_kernel(cross_ptr, gram_ptr, b_ptr, m_ptr, w2_ptr, norm_ptr, scale_ptr, b_eff_ptr, b_s_ptr, r, d_out,
                          scaling, R: tl.constexpr, BLOCK_N: tl.constexpr):
        """One layer's constants from its A·W0ᵀ and A·Aᵀ, as `reference.gram_row_norm`, for BLOCK_N rows of W0 a
        program: ‖w_i‖² + Σ_j B_ij·(2s·(W0Aᵀ)_ij + s²·(B·A·Aᵀ)_ij), m / norm, and s·B scaled by it and not, in the
        branch's dtype."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, R)
        col_mask = cols < d_out
        gram = tl.load(gram_ptr + ks[:, None] * r + ks[None, :], mask=(ks[:, None] < r) & (ks[None, :] < r), other=0.0)
        mask = col_mask[:, None] & (ks[None, :] < r)
        b = tl.load(b_ptr + cols[:, None] * r + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        cross = tl.load(cross_ptr + ks[None, :] * d_out + cols[:, None], mask=mask, other=0.0).to(tl.float32)
        t = 2 * scaling * cross + scaling * scaling * tl.dot(b, gram, input_precision="ieee")
        norm = tl.sqrt(tl.maximum(tl.sum(b * t, axis=1) + tl.load(w2_ptr + cols, mask=col_mask, other=0.0), 0.0))
        scale = tl.load(m_ptr + cols, mask=col_mask, other=1.0).to(tl.float32) / norm
        tl.store(norm_ptr + cols, norm, mask=col_mask)
        tl.store(scale_ptr + cols, scale, mask=col_mask)
        sb = b * scaling
        offs = cols[:, None] * r + ks[None, :]
        tl.store(b_eff_ptr + offs, (sb * scale[:, None]).to(b_eff_ptr.dtype.element_ty), mask=mask)
        tl.store(b_s_ptr + offs, sb.to(b_s_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dora_grad_kernel(g_ptr, y_ptr, ax_ptr, scale_ptr, m_ptr, bias_ptr, gz_ptr, part_ptr, n_rows, n_cols, r,
                          scaling, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          R: tl.constexpr, ITERS: tl.constexpr):
        """gz = g·scale, and over this program's rows the partial sums (float32) of B's gradient, s·gzᵀ·ax, and of
        m's, Σ g·(y - bias) / m: one pass over g, y and ax."""
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, R)
        col_mask = cols < n_cols
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_m = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, R], dtype=tl.float32)
        for i in range(ITERS):
            rows = (pid_t * ITERS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= bias[None, :]
            gz = (g * scale[None, :]).to(gz_ptr.dtype.element_ty)
            tl.store(gz_ptr + offs, gz, mask=mask)
            acc_m += tl.sum(g * y, axis=0)
            a = tl.load(ax_ptr + rows[:, None].to(tl.int64) * r + ks[None, :],
                        mask=row_mask[:, None] & (ks[None, :] < r), other=0.0)
            acc_b = tl.dot(tl.trans(gz.to(a.dtype)), a, acc_b)
        m = tl.load(m_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
        out = part_ptr + pid_t.to(tl.int64) * n_cols * (r + 1)
        tl.store(out + cols[:, None] * r + ks[None, :], acc_b * scaling, mask=col_mask[:, None] & (ks[None, :] < r))
        tl.store(out + n_cols * r + cols, acc_m / m, mask=col_mask)


    @triton.jit
    def _sum_rows_kernel(part_ptr, out_ptr, n_rows, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """out = Σ_rows part (n_rows × n_cols, float32), BLOCK_P rows at a time, in one fixed order."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for p0 in range(0, n_rows, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            mask = (rows[:, None] < n_rows) & col_mask[None, :]
            acc += tl.sum(tl.load(part_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask,
                                  other=0.0), axis=0)
        tl.store(out_ptr + cols, acc, mask=col_mask)

@functools.cache
def _sm_count(device: int | None) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_triton(t: Tensor, use: bool) -> bool:
    """Whether to launch a kernel for `t`: asked to, Triton present, and `t` on CUDA."""
    return use and triton is not None and t.is_cuda


def _fused(ax: Tensor, use: bool) -> bool:
    """The Triton kernels of the layer's output and gradients: on CUDA, with a 16-bit LoRA branch (a float32 one
    would go through TF32 in `tl.dot`)."""
    return on_triton(ax, use) and ax.dtype in (torch.bfloat16, torch.float16)


def dora_out(result: Tensor, ax: Tensor, scale: Tensor, b_eff: Tensor, bias: Tensor | None, use_triton: bool,
             ) -> Tensor:
    """y = scale ⊙ result + (1 - scale) ⊙ b + ax·b_effᵀ, from the base output (its bias b included)."""
    if _fused(ax, use_triton):
        result, ax = result.contiguous(), ax.contiguous()
        n_cols, r = result.shape[-1], ax.shape[-1]
        n_rows = result.numel() // n_cols
        y = torch.empty_like(result)
        _dora_out_kernel[(triton.cdiv(n_rows, 64), triton.cdiv(n_cols, 64))](
            result, ax, b_eff, scale, scale if bias is None else bias, y, n_rows, n_cols, r, HAS_BIAS=bias is not None,
            BLOCK_T=64, BLOCK_N=64, R=triton.next_power_of_2(max(r, 16)))
        return y
    y = torch.matmul(ax, b_eff.T)
    if bias is not None:
        y += ((1 - scale) * bias.detach().float()).to(y.dtype)
    return y.addcmul_(result, scale).to(result.dtype)


def dora_grads(grad: Tensor, y: Tensor, ax: Tensor, scale: Tensor, magnitude: Tensor, b_s: Tensor,
               bias: Tensor | None, scaling: float, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `dora_out`'s inputs from its output's, `grad`: (the base output's, g·scale; ax's; B's
    and m's, flattened into one float32 vector). m's is Σ_tokens g·(y - b) / m."""
    n_out, r = b_s.shape
    g2, y2, ax2 = grad.reshape(-1, n_out), y.reshape(-1, n_out), ax.reshape(-1, r)
    if _fused(ax, use_triton):
        g2, ax2 = g2.contiguous(), ax2.contiguous()
        n_rows = g2.shape[0]
        block_t, block_n = 32, 64
        col_blocks = triton.cdiv(n_out, block_n)
        row_tiles = triton.cdiv(n_rows, block_t)
        # enough programs to fill the GPU; a power of two, so that few variants compile however many rows there are
        iters = min(64, triton.next_power_of_2(triton.cdiv(row_tiles, triton.cdiv(4 * _sm_count(g2.device.index),
                                                                                   col_blocks))))
        row_progs = triton.cdiv(row_tiles, iters)
        gz = torch.empty_like(g2)
        part = torch.empty(row_progs, n_out * (r + 1), device=g2.device, dtype=torch.float32)
        _dora_grad_kernel[(row_progs, col_blocks)](
            g2, y2, ax2, scale, magnitude, scale if bias is None else bias, gz, part, n_rows, n_out, r, scaling,
            HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_N=block_n, R=triton.next_power_of_2(max(r, 16)),
            ITERS=iters)
        # a sum of its own: the last program adding up the others' (a counter in memory) is slower
        b_and_m = _sum_rows(part) if row_progs > 1 else part[0]
    else:
        gz = torch.mul(g2, scale, out=torch.empty_like(g2))
        g_y = (g2 * y2).sum(0, dtype=torch.float32)
        if bias is not None:
            g_y -= bias.float() * g2.sum(0, dtype=torch.float32)
        grad_b = (gz.to(ax.dtype).T @ ax2).float().mul_(scaling)
        b_and_m = torch.cat([grad_b.flatten(), g_y / magnitude])
    grad_ax = torch.matmul(gz.to(ax.dtype), b_s).view(ax.shape)
    return gz.view(grad.shape), grad_ax, b_and_m


def _sum_rows(part: Tensor) -> Tensor:
    """Σ over the rows of the grad kernel's partial sums, in one fixed order (faster than torch's column sum)."""
    n_rows, n_cols = part.shape
    block_p = min(32, triton.next_power_of_2(n_rows))
    block_n = 4096 // block_p
    out = part.new_empty(n_cols)
    _sum_rows_kernel[(triton.cdiv(n_cols, block_n),)](part, out, n_rows, n_cols, BLOCK_P=block_p, BLOCK_N=block_n)
    return out


def split_b_and_m(b_and_m: Tensor, lora_b: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """B's and m's gradients from `dora_grads`' one vector, each in its parameter's dtype."""
    n_out, r = lora_b.shape
    return b_and_m[: n_out * r].view(n_out, r).to(lora_b.dtype), b_and_m[n_out * r :].to(magnitude.dtype)


_POINTERS: dict[tuple, Tensor] = {}  # (device, weights' addresses) -> those addresses, on the device


def grouped_a_w0t(weights: list[Tensor], a: Tensor) -> Tensor | None:
    """A·W0ᵀ of L layers (L × r × d_out, float32) from their plain CUDA weights in one Triton launch
    (`_a_w0t_kernel`). None unless the weights are 16-bit, of one dtype and contiguous, and inside a CUDA graph's
    recording if the table of the weights' addresses is not on the device yet (the host's copy of a new table cannot
    be recorded; the warm-up passes before a recording make it)."""
    if not (weights[0].dtype in (torch.bfloat16, torch.float16)
            and all(w.dtype == weights[0].dtype and w.is_contiguous() for w in weights)):
        return None
    key = (a.device, *(w.data_ptr() for w in weights))
    table = _POINTERS.get(key)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        # from pinned memory, without waiting: the host does not stop for the GPU outside logging steps
        table = _POINTERS[key] = torch.tensor(key[1:], dtype=torch.int64).pin_memory().to(a.device, non_blocking=True)
    n_layers, r, d_in = a.shape
    d_out = weights[0].shape[0]
    out = torch.empty(n_layers, r, d_out, device=a.device, dtype=torch.float32)
    _a_w0t_kernel[(n_layers, triton.cdiv(d_out, 64))](
        table, a, out, r, d_in, d_out, W_DTYPE=tl.bfloat16 if weights[0].dtype == torch.bfloat16 else tl.float16,
        R=triton.next_power_of_2(max(r, 16)), BLOCK_N=64, BLOCK_K=64)
    return out


def layer_norm_consts(cross: Tensor, gram: Tensor, lora_b: Tensor, magnitude: Tensor, w2: Tensor, scaling: float,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(norm, scale, b_eff, b_s) of one layer from its A·W0ᵀ (r × d_out) and A·Aᵀ in one Triton launch
    (`_dora_norm_kernel`), where torch would take a dozen small kernels."""
    r, d_out = cross.shape
    norm, scale = (cross.new_empty(d_out, dtype=torch.float32) for _ in range(2))
    b_eff, b_s = (cross.new_empty(d_out, r, dtype=dtype) for _ in range(2))
    _dora_norm_kernel[(triton.cdiv(d_out, 64),)](
        cross.contiguous(), gram.contiguous(), lora_b.contiguous(), magnitude.contiguous(), w2, norm, scale, b_eff,
        b_s, r, d_out, scaling, R=triton.next_power_of_2(max(r, 16)), BLOCK_N=64)
    return norm, scale, b_eff, b_s
