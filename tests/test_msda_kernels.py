"""Fast multi-scale deformable attention backends against an independent float64 per-point loop.

The Triton kernels are checked in Triton's CPU interpreter: TRITON_INTERPRET must be set before the kernels
are decorated (when ``solq.models.msda_triton`` is first imported), so ``test_triton_kernels_in_interpreter``
re-runs this file's ``test_interp_*`` tests in a subprocess with the variable set; in the normal run they
skip. ``TRITON_INTERPRET=1 pytest tests/test_msda_kernels.py -k interp`` runs them directly.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from solq.models import msda_fused
from solq.models.msda_fused import ms_deform_attn_fused

triton_mod = pytest.importorskip("solq.models.msda_triton")


# ---------------------------------------------------------------- independent definition and inputs
def naive_msda(value, spatial_shapes, level_start_index, locations, weights):
    """Per-point Python loop, straight from the definition (reference §2.5); differentiable via autograd.

    value [B,S,M,D]; locations [B,Q,M,L,P,2] (x,y); weights [B,Q,M,L,P] -> [B,Q,M*D]."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = [[[value.new_zeros(D) for _ in range(M)] for _ in range(Q)] for _ in range(B)]
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for lvl in range(L):
                    H, W = (int(v) for v in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for p in range(P):
                        px = locations[b, q, m, lvl, p, 0] * W - 0.5
                        py = locations[b, q, m, lvl, p, 1] * H - 0.5
                        x0, y0 = math.floor(px.item()), math.floor(py.item())
                        fx, fy = px - x0, py - y0
                        for dy in (0, 1):
                            for dx in (0, 1):
                                x, y = x0 + dx, y0 + dy
                                if 0 <= x < W and 0 <= y < H:
                                    bil = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
                                    out[b][q][m] = out[b][q][m] + weights[b, q, m, lvl, p] * bil * \
                                        value[b, start + y * W + x, m]
    return torch.stack([torch.stack([torch.cat(out[b][q]) for q in range(Q)]) for b in range(B)])


def make_inputs(shapes, *, B=2, Q=3, M=2, D=5, P=2, dtype=torch.float64, seed=0, spread=1.4, pad_tokens=0):
    """Random inputs; locations in [-(spread-1)/2, 1+(spread-1)/2] so some fall outside the maps;
    the last ``pad_tokens`` tokens of every level of image 0 are zeroed (padding mask)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    if pad_tokens:
        for st, n in zip(starts.tolist(), sizes.tolist()):
            value[0, st + max(n - pad_tokens, 0): st + n] = 0
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * spread - (spread - 1) / 2
    aw = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype).softmax(-1)
    return value, spatial_shapes, starts, loc, aw


def probe_like(out, seed=1):
    """A fixed random tensor shaped like ``out``: the loss <out, probe> gives every output a gradient."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)


def value_and_grads(fn, args):
    """fn output and the gradients (value, locations, weights) of <out, probe>."""
    ins = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*ins)
    grads = torch.autograd.grad((out * probe_like(out)).sum(), [ins[0], ins[3], ins[4]])
    return out, grads


def assert_close_all(got, want, rtol, atol):
    (o1, g1), (o2, g2) = got, want
    torch.testing.assert_close(o1.double(), o2.double(), rtol=rtol, atol=atol)
    for name, a, b in zip(("value", "locations", "weights"), g1, g2):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=f"grad {name}")


CASES = {  # name: (level shapes, kwargs) -- odd sizes, 1..4 levels, 1..8 heads, 1..4 points, D not 2^k
    "3lvl_odd": ([(3, 5), (2, 3), (1, 1)], dict(B=2, Q=3, M=2, D=5, P=2)),
    "4lvl_D48": ([(4, 7), (2, 4), (1, 2), (1, 1)], dict(B=1, Q=2, M=1, D=48, P=1)),
    "8heads": ([(5, 3)], dict(B=1, Q=2, M=8, D=3, P=1)),
    "4points": ([(3, 4), (2, 2)], dict(B=1, Q=2, M=1, D=4, P=4)),
    "padded_far": ([(4, 6), (2, 3)], dict(B=2, Q=3, M=2, D=3, P=3, spread=3.0, pad_tokens=3)),
}


# ---------------------------------------------------------------- fused PyTorch path
@pytest.mark.parametrize("grad_strategy", ["by_taps", "by_patches"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_naive_float64(case, grad_strategy, monkeypatch):
    # the value gradient sorts taps (few taps per token) or points by 2x2 patch (many): force each
    monkeypatch.setattr(msda_fused, "_TAPS_PER_ROW_FOR_PATCHES", 10**9 if grad_strategy == "by_taps" else 0)
    shapes, kw = CASES[case]
    args = make_inputs(shapes, **kw)
    assert_close_all(value_and_grads(ms_deform_attn_fused, args), value_and_grads(naive_msda, args),
                     rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("taps_per_row", [10**9, 0])  # value gradient by taps / by patches
def test_fused_gradcheck_and_boundaries(taps_per_row, monkeypatch):
    monkeypatch.setattr(msda_fused, "_TAPS_PER_ROW_FOR_PATCHES", taps_per_row)
    value, shapes, starts, loc, aw = make_inputs([(3, 4), (2, 2)], B=1, Q=4, M=2, D=3, P=2)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), aw.requires_grad_())
    assert torch.autograd.gradcheck(ms_deform_attn_fused, args)  # random points: no kinks
    # exact pixel centres (kinks: both sides use the floor convention), map edges, points outside
    loc = loc.detach().clone()
    loc[0, 0, 0, 0, :, 0] = torch.tensor([0.5 / 4, -0.3], dtype=loc.dtype)
    loc[0, 1, 1, 1, :, 1] = torch.tensor([1.2, 0.999], dtype=loc.dtype)
    loc[0, 2, 0, 1, 0] = torch.tensor([0.0, 1.0], dtype=loc.dtype)
    loc[0, 3, 1, 0, 1] = torch.tensor([1.5 / 4, 2.5 / 3], dtype=loc.dtype)
    args = (value, shapes, starts, loc, aw)
    assert_close_all(value_and_grads(ms_deform_attn_fused, args), value_and_grads(naive_msda, args),
                     rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("taps_per_row", [10**9, 0])  # value gradient by taps / by patches
def test_fused_matches_reference_backend_float32(taps_per_row, monkeypatch):
    monkeypatch.setattr(msda_fused, "_TAPS_PER_ROW_FOR_PATCHES", taps_per_row)
    reference = pytest.importorskip("solq.models.deformable_attention").ms_deform_attn_reference
    args = make_inputs([(9, 13), (5, 7), (3, 4), (2, 2)], B=2, Q=40, M=4, D=8, P=4, dtype=torch.float32,
                       pad_tokens=5)
    assert_close_all(value_and_grads(ms_deform_attn_fused, args), value_and_grads(reference, args),
                     rtol=1e-4, atol=1e-5)


def test_fused_partial_grads_no_grad_batched_and_int64_indices(monkeypatch):
    args = make_inputs([(3, 5), (2, 3)], B=2, Q=3, M=2, D=4, P=2)
    value, shapes, starts, loc, aw = args
    want, (gv, gl, ga) = value_and_grads(ms_deform_attn_fused, args)
    with torch.no_grad():  # inference path (no patch rows, nothing saved)
        torch.testing.assert_close(ms_deform_attn_fused(*args), want)
    # only the locations need a gradient / only the value does
    l2 = loc.clone().requires_grad_()
    out = ms_deform_attn_fused(value, shapes, starts, l2, aw)
    torch.testing.assert_close(torch.autograd.grad((out * probe_like(out)).sum(), l2)[0], gl)
    v2 = value.clone().requires_grad_()
    out = ms_deform_attn_fused(v2, shapes, starts, loc, aw)
    torch.testing.assert_close(torch.autograd.grad((out * probe_like(out)).sum(), v2)[0], gv)
    # batched equals image by image
    one = torch.cat([ms_deform_attn_fused(value[i:i + 1], shapes, starts, loc[i:i + 1], aw[i:i + 1])
                     for i in range(2)])
    torch.testing.assert_close(one, want)
    # int64 index path (normally only for tables beyond 2^31 rows), both value-gradient strategies
    monkeypatch.setattr(msda_fused, "_INT32_MAX", 10)
    for taps_per_row in (10**9, 0):
        monkeypatch.setattr(msda_fused, "_TAPS_PER_ROW_FOR_PATCHES", taps_per_row)
        assert_close_all(value_and_grads(ms_deform_attn_fused, args), (want, (gv, gl, ga)),
                         rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_value(dtype):
    value, shapes, starts, loc, aw = make_inputs([(4, 6), (2, 3)], B=1, Q=5, M=2, D=8, P=2, dtype=torch.float32)
    args = (value.to(dtype), shapes, starts, loc, aw)  # locations/weights stay float32 (taps in float32)
    out, (gv, gl, ga) = value_and_grads(ms_deform_attn_fused, args)
    assert out.dtype == gv.dtype == dtype and gl.dtype == ga.dtype == torch.float32
    want, (wv, wl, wa) = value_and_grads(naive_msda, tuple(a.double() if a.is_floating_point() else a
                                                           for a in args))
    for got, exp, scale in ((out, want, 1), (gv, wv, 1), (ga, wa, 1), (gl, wl, 10)):  # d loc scales with W
        torch.testing.assert_close(got.double(), exp, rtol=2e-2, atol=2e-2 * scale)


def test_fused_rejects_inconsistent_shapes():
    value, shapes, starts, loc, aw = make_inputs([(3, 5)], B=1, Q=2, M=2, D=4, P=1)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ms_deform_attn_fused(value, shapes, starts, loc[:, :, :1], aw)


def test_fused_traces_with_dynamo_without_graph_breaks():
    args = make_inputs([(3, 5), (2, 3)], B=1, Q=3, M=2, D=4, P=2, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(ms_deform_attn_fused, backend="eager", fullgraph=True)
    assert_close_all(value_and_grads(compiled, args), value_and_grads(ms_deform_attn_fused, args),
                     rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- Triton kernels
def test_triton_availability_reports_reason():
    reason = triton_mod.triton_unavailable_reason()
    assert triton_mod.triton_available() == (reason is None)
    if not torch.cuda.is_available():
        assert not triton_mod.triton_available() and reason
        if triton_mod.triton is not None and not triton_mod.interpreting():
            value, shapes, starts, loc, aw = make_inputs([(3, 5)], B=1, Q=2, M=1, D=4, P=1)
            with pytest.raises(RuntimeError, match="needs CUDA tensors"):
                triton_mod.ms_deform_attn_triton(value, shapes, starts, loc, aw)


def test_auto_policy_matches_its_choice():
    args = make_inputs([(3, 5), (2, 3)], B=1, Q=3, M=2, D=4, P=2, dtype=torch.float32)
    chosen = triton_mod.ms_deform_attn_triton if args[0].is_cuda and triton_mod.triton_available() \
        else ms_deform_attn_fused
    torch.testing.assert_close(triton_mod.ms_deform_attn_auto(*args), chosen(*args), rtol=0, atol=0)


def test_triton_kernels_in_interpreter():
    if triton_mod.triton is None:
        pytest.skip(f"triton not importable: {triton_mod._IMPORT_ERROR}")
    if triton_mod.interpreting():
        pytest.skip("already interpreting: the test_interp_* tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp",
                           str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and " passed" in proc.stdout and " failed" not in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-2000:]


needs_interpreter = pytest.mark.skipif(
    triton_mod.triton is None or not triton_mod.interpreting()
    or type(getattr(triton_mod, "_msda_fwd_kernel", None)).__name__ != "InterpretedFunction",
    reason="needs TRITON_INTERPRET=1 before solq.models.msda_triton is imported (see module docstring)")


@needs_interpreter
@pytest.mark.parametrize("case", sorted(CASES))
def test_interp_triton_matches_naive_float64(case):
    shapes, kw = CASES[case]
    args = make_inputs(shapes, **kw)
    assert_close_all(value_and_grads(triton_mod.ms_deform_attn_triton, args), value_and_grads(naive_msda, args),
                     rtol=1e-10, atol=1e-10)


@needs_interpreter
def test_interp_triton_float32_matches_fused():
    args = make_inputs([(3, 5), (2, 3), (1, 1)], B=2, Q=3, M=2, D=5, P=2, dtype=torch.float32, pad_tokens=2)
    assert_close_all(value_and_grads(triton_mod.ms_deform_attn_triton, args),
                     value_and_grads(ms_deform_attn_fused, args), rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_triton_half_precision(dtype):
    value, shapes, starts, loc, aw = make_inputs([(3, 5), (2, 3)], B=1, Q=3, M=2, D=8, P=2, dtype=torch.float32)
    args = (value.to(dtype), shapes, starts, loc, aw)
    out, (gv, gl, ga) = value_and_grads(triton_mod.ms_deform_attn_triton, args)
    assert out.dtype == gv.dtype == dtype and gl.dtype == ga.dtype == torch.float32
    # float32 accumulation: only the inputs' and outputs' rounding separates it from the exact result
    want, (wv, wl, wa) = value_and_grads(naive_msda, tuple(a.double() if a.is_floating_point() else a
                                                           for a in args))
    tol = dict(float16=2e-3, bfloat16=2e-2)[str(dtype).split(".")[1]]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gv.double(), wv, rtol=tol, atol=tol)
    torch.testing.assert_close(ga.double(), wa, rtol=tol, atol=tol)
    torch.testing.assert_close(gl.double(), wl, rtol=tol, atol=tol * 10)  # scaled by the map sizes
