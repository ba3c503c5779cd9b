"""Multi-scale deformable attention as a Triton kernel (GPU; forward and backward, no build step).

Same signature and semantics as ``msda_reference.ms_deform_attn_reference``: for each
(b, q, m, l, p) sample level l of head m bilinearly at pixel coordinates (x*W_l - 0.5, y*H_l - 0.5), each of
the 4 corner taps contributing only when it lies inside the map (zero padding, align_corners=False),
multiply by the attention weight and sum over levels and points.

One program handles BLOCK_Q queries of one (image, head): it walks the L*P points x 4 taps, loading
[BLOCK_Q, D] value tiles (contiguous along D) and accumulating in float32 (float64 for float64 inputs), so
fp16/bf16 inputs are accepted and the output has the value's dtype. The backward recomputes the taps,
accumulates the value gradient with atomic adds into a float32/float64 buffer and writes the location and
attention-weight gradients (each point is owned by exactly one program, so no atomics there).

The kernels are plain ``@triton.jit`` functions: they compile on first use on a CUDA device. With
``TRITON_INTERPRET=1`` set in the environment BEFORE this module is imported (Triton reads it when the
decorator runs), they run in Triton's numpy interpreter on CPU tensors; the tests use that.
:func:`triton_available` tells the backend policy whether the real (CUDA) path works.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .msda_fused import ms_deform_attn_fused

try:  # triton is optional: the module imports without it and reports why the backend is unavailable
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["ms_deform_attn_triton", "ms_deform_attn_auto", "triton_available", "triton_unavailable_reason",
           "interpreting"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _tap_coords(loc_ptr, aw_ptr, pt, mask_q, W, H, ACC: tl.constexpr):
        """Point pt [BLOCK_Q] -> (x0, y0 int32, fx, fy, attention weight, not-NaN mask) in ACC dtype."""
        x = tl.load(loc_ptr + pt * 2, mask=mask_q, other=0.0).to(ACC)
        y = tl.load(loc_ptr + pt * 2 + 1, mask=mask_q, other=0.0).to(ACC)
        a = tl.load(aw_ptr + pt, mask=mask_q, other=0.0).to(ACC)
        px = x * W.to(ACC) - 0.5
        py = y * H.to(ACC) - 0.5
        ok = mask_q & (px == px) & (py == py)  # NaN locations sample nothing
        # clamp far-away points (all taps outside anyway) so the int conversion is defined
        px = tl.minimum(tl.maximum(px, -2.0), W.to(ACC) + 1.0)
        py = tl.minimum(tl.maximum(py, -2.0), H.to(ACC) + 1.0)
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        return x0f.to(tl.int32), y0f.to(tl.int32), px - x0f, py - y0f, a, ok

    @triton.jit
    def _tap_rows(x0, y0, DX: tl.constexpr, DY: tl.constexpr, W, H, base, M, ok):
        """Row of value.view(B*S*M, D) for tap (x0+DX, y0+DY) [BLOCK_Q] int64 and its inside-the-map mask."""
        xi = x0 + DX
        yi = y0 + DY
        inside = ok & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        return (base + (yi * W + xi).to(tl.int64)) * M, inside

    @triton.jit
    def _program_tile(Q, M: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's (image b, head m, query offsets [BLOCK_Q], channel offsets [BLOCK_D], their masks,
        bag indices (b, q, m) [BLOCK_Q] int64)."""
        pid_q = tl.program_id(0)
        pid_bm = tl.program_id(1)
        b = pid_bm // M
        m = pid_bm % M
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        bqm = (b * Q + offs_q).to(tl.int64) * M + m
        return b, m, offs_q, offs_d, offs_q < Q, offs_d < D, bqm

    @triton.jit
    def _level(shapes_ptr, starts_ptr, lvl, b, S):
        """(H, W) int32 of level lvl and the token index of its (0, 0) in image b (int64)."""
        H = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        return H, W, b.to(tl.int64) * S + tl.load(starts_ptr + lvl)

    @triton.jit
    def _msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, aw_ptr, out_ptr, S, Q,
                         M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        b, m, offs_q, offs_d, mask_q, mask_d, bqm = _program_tile(Q, M, D, BLOCK_Q, BLOCK_D)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
        for lvl in tl.static_range(L):
            H, W, base = _level(shapes_ptr, starts_ptr, lvl, b, S)
            for p in tl.static_range(P):
                pt = (bqm * L + lvl) * P + p
                x0, y0, fx, fy, a, ok = _tap_coords(loc_ptr, aw_ptr, pt, mask_q, W, H, ACC)
                for c in tl.static_range(4):
                    DX: tl.constexpr = c % 2
                    DY: tl.constexpr = c // 2
                    row, inside = _tap_rows(x0, y0, DX, DY, W, H, base, M, ok)
                    wx = fx if DX == 1 else 1.0 - fx
                    wy = fy if DY == 1 else 1.0 - fy
                    v = tl.load(value_ptr + (row + m)[:, None] * D + offs_d[None, :],
                                mask=inside[:, None] & mask_d[None, :], other=0.0).to(ACC)
                    acc += (a * wx * wy)[:, None] * v
        out_ptrs = out_ptr + bqm[:, None] * D + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])

    @triton.jit
    def _msda_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, aw_ptr, grad_out_ptr,
                         grad_value_ptr, grad_loc_ptr, grad_aw_ptr, S, Q,
                         M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        b, m, offs_q, offs_d, mask_q, mask_d, bqm = _program_tile(Q, M, D, BLOCK_Q, BLOCK_D)
        g = tl.load(grad_out_ptr + bqm[:, None] * D + offs_d[None, :],
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(ACC)  # [BLOCK_Q, BLOCK_D]
        for lvl in tl.static_range(L):
            H, W, base = _level(shapes_ptr, starts_ptr, lvl, b, S)
            for p in tl.static_range(P):
                pt = (bqm * L + lvl) * P + p
                x0, y0, fx, fy, a, ok = _tap_coords(loc_ptr, aw_ptr, pt, mask_q, W, H, ACC)
                g_aw = tl.zeros((BLOCK_Q,), dtype=ACC)
                g_fx = tl.zeros((BLOCK_Q,), dtype=ACC)
                g_fy = tl.zeros((BLOCK_Q,), dtype=ACC)
                for c in tl.static_range(4):
                    DX: tl.constexpr = c % 2
                    DY: tl.constexpr = c // 2
                    row, inside = _tap_rows(x0, y0, DX, DY, W, H, base, M, ok)
                    wx = fx if DX == 1 else 1.0 - fx
                    wy = fy if DY == 1 else 1.0 - fy
                    ptrs = (row + m)[:, None] * D + offs_d[None, :]
                    tile_mask = inside[:, None] & mask_d[None, :]
                    v = tl.load(value_ptr + ptrs, mask=tile_mask, other=0.0).to(ACC)
                    s = tl.sum(g * v, axis=1)  # <grad_out, tap value> [BLOCK_Q]
                    g_aw += wx * wy * s
                    g_fx += (wy * s) if DX == 1 else -(wy * s)
                    g_fy += (wx * s) if DY == 1 else -(wx * s)
                    tl.atomic_add(grad_value_ptr + ptrs, (a * wx * wy)[:, None] * g, mask=tile_mask)
                tl.store(grad_aw_ptr + pt, g_aw.to(grad_aw_ptr.dtype.element_ty), mask=mask_q)
                gx = a * g_fx * W.to(ACC)
                gy = a * g_fy * H.to(ACC)
                tl.store(grad_loc_ptr + pt * 2, gx.to(grad_loc_ptr.dtype.element_ty), mask=mask_q)
                tl.store(grad_loc_ptr + pt * 2 + 1, gy.to(grad_loc_ptr.dtype.element_ty), mask=mask_q)


def _launch_config(D: int, Q: int):
    """(BLOCK_Q, BLOCK_D, num_warps): D padded to a power of two (masked), ~2K elements per tile."""
    block_d = triton.next_power_of_2(D)
    block_q = max(1, min(64, 2048 // block_d, triton.next_power_of_2(Q)))
    return block_q, block_d, 4 if block_q * block_d >= 1024 else 2


def _acc_dtype(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if triton is None:
        raise RuntimeError(f"msda_triton: Triton is not importable ({_IMPORT_ERROR}); use backend 'fused'")
    B, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[0] != B or sampling_locations.shape[2] != M \
            or sampling_locations.shape[-1] != 2 or attention_weights.shape != sampling_locations.shape[:-1] \
            or spatial_shapes.shape != (sampling_locations.shape[3], 2) \
            or level_start_index.shape != (sampling_locations.shape[3],):
        raise ValueError(
            "msda_triton: inconsistent shapes: value [B,S,M,D]=%s, sampling_locations [B,Q,M,L,P,2]=%s, "
            "attention_weights [B,Q,M,L,P]=%s, spatial_shapes [L,2]=%s, level_start_index [L]=%s"
            % (tuple(value.shape), tuple(sampling_locations.shape), tuple(attention_weights.shape),
               tuple(spatial_shapes.shape), tuple(level_start_index.shape)))
    if not value.is_cuda and not interpreting():
        raise RuntimeError("msda_triton: the Triton backend needs CUDA tensors (got %s); use backend 'fused' "
                           "on this device, or set TRITON_INTERPRET=1 before importing triton to run the "
                           "kernels in Triton's CPU interpreter (slow, for tests)" % value.device)


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        value = value.contiguous()
        shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        starts = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        loc = sampling_locations.contiguous()
        aw = attention_weights.contiguous()
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = loc.shape
        out = torch.empty(B, Q, M * D, dtype=value.dtype, device=value.device)
        block_q, block_d, warps = _launch_config(D, Q)
        grid = (triton.cdiv(Q, block_q), B * M)
        _msda_fwd_kernel[grid](value, shapes, starts, loc, aw, out, S, Q, M=M, D=D, L=L, P=P,
                               BLOCK_Q=block_q, BLOCK_D=block_d, ACC=_acc_dtype(value, loc, aw),
                               num_warps=warps)
        ctx.save_for_backward(value, shapes, starts, loc, aw)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, starts, loc, aw = ctx.saved_tensors
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = loc.shape
        acc = _acc_dtype(value, loc, aw)
        # atomics accumulate in float32 (float64 for float64 inputs), cast once at the end
        grad_value = torch.zeros(value.shape, device=value.device,
                                 dtype=torch.float64 if acc == tl.float64 else torch.float32)
        grad_loc = torch.empty_like(loc)
        grad_aw = torch.empty_like(aw)
        block_q, block_d, warps = _launch_config(D, Q)
        grid = (triton.cdiv(Q, block_q), B * M)
        _msda_bwd_kernel[grid](value, shapes, starts, loc, aw, grad_out.contiguous(), grad_value, grad_loc,
                               grad_aw, S, Q, M=M, D=D, L=L, P=P, BLOCK_Q=block_q, BLOCK_D=block_d, ACC=acc,
                               num_warps=warps)
        return grad_value.to(value.dtype), None, None, grad_loc, grad_aw


def ms_deform_attn_triton(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core on the GPU (Triton).

    value: [B,S,M,D] float16/bfloat16/float32/float64 (padding already zeroed); spatial_shapes: int64 [L,2]
    (H_l,W_l); level_start_index: int64 [L]; sampling_locations: [B,Q,M,L,P,2] (x,y) in [0,1] (outside the
    map -> zeros); attention_weights: [B,Q,M,L,P]. Returns [B,Q,M*D] in value's dtype; differentiable
    w.r.t. value, sampling_locations and attention_weights. Raises RuntimeError without CUDA tensors
    (unless TRITON_INTERPRET=1) or without Triton.
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _MSDeformAttnTriton.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> Optional[str]:
    """None when the Triton backend works on the current CUDA device, else why not (checked once: a tiny
    forward + backward compared with the fused PyTorch path)."""
    if triton is None:
        return f"Triton is not importable ({_IMPORT_ERROR})"
    if interpreting():
        return "TRITON_INTERPRET=1 is set (the CPU interpreter is for tests, far too slow to use)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        gen = torch.Generator().manual_seed(0)
        cpu = (torch.randn(1, 19, 2, 8, generator=gen), torch.tensor([[3, 5], [2, 2]]), torch.tensor([0, 15]),
               torch.rand(1, 4, 2, 2, 2, 2, generator=gen) * 1.2 - 0.1, torch.rand(1, 4, 2, 2, 2, generator=gen))
        results = []
        for fn, device in ((ms_deform_attn_triton, "cuda"), (ms_deform_attn_fused, "cpu")):
            args = [t.to(device).requires_grad_(t.is_floating_point()) for t in cpu]
            out = fn(*args)
            grads = torch.autograd.grad(out.square().sum(), (args[0], args[3], args[4]))
            results.append([t.detach().cpu() for t in (out, *grads)])
        for a, b in zip(*results):
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
                return "the Triton kernel disagrees with the fused PyTorch path (checked on CPU)"
    except Exception as exc:  # compilation or launch failure: report it, fall back
        return f"the Triton kernel failed on this device ({type(exc).__name__}: {exc})"
    return None


@torch.compiler.assume_constant_result  # evaluated once when traced, not a graph break
def triton_available() -> bool:
    """Whether CUDA + Triton can run this backend (for the 'auto' policy); see triton_unavailable_reason."""
    return triton_unavailable_reason() is None


def ms_deform_attn_auto(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The 'auto' backend policy: the Triton kernel for CUDA tensors when :func:`triton_available`, else
    the fused PyTorch path (``msda_fused.ms_deform_attn_fused``). Same arguments and result."""
    fn = ms_deform_attn_triton if value.is_cuda and triton_available() else ms_deform_attn_fused
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
