"""Fused multi-scale deformable attention sampling in plain PyTorch (any device; the CPU fast path).

Same signature and semantics as ``deformable_attention.ms_deform_attn_reference`` (reference §2.5): for each
(b, q, m, l, p) sample level l of head m bilinearly at pixel coordinates (x*W_l - 0.5, y*H_l - 0.5), each of
the 4 corner taps contributing only when it lies inside the map (zero padding, align_corners=False),
multiply by the attention weight and sum over levels and points.

Instead of one ``grid_sample`` per level followed by a stack and a weighted sum, all levels and heads are
handled at once: ``value`` is viewed as a table of B*S*M rows of length D, every sampling point becomes 4
taps (row index; bilinear weight x inside-the-map x attention weight), and ONE ``embedding_bag`` (a fused
weighted row sum) computes each output vector from its 4*L*P taps. Nothing of size [..., 4*L*P, D] is
materialised. Forward and backward are one custom autograd function (autograd's own embedding_bag
backward costs ~10x the forward here, and autograd through the tap construction ~3x the hand-written
chain rule):

- value gradient = the transposed problem: taps sorted by value row make it one more ``embedding_bag``
  over the output gradient (one bag per value row). With many taps per value token (the encoder, 64) the
  4x fewer points are sorted instead, by the row of their 2x2 patch in a table with a 1-pixel border per
  level, which groups each corner's taps by destination; two ``embedding_bag`` calls (points -> patch
  rows per corner -> tokens) finish it;
- tap-weight gradient = one dot product <grad_out, value row> per tap (a sampled dense-dense product),
  from which the location and attention-weight gradients follow in closed form with a few elementwise
  ops on [L*P, N] tensors.

The elementwise work runs in a point-minor layout ([L*P, axis, B*Q*M]) with in-place ops: long contiguous
inner loops and few fresh allocations (page faults on fresh memory are a large part of the CPU cost).

No Python loops over levels, heads or points and no data-dependent control flow in the forward.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_fused", "corner_taps"]

_INT32_MAX = 2**31 - 1
# Above this many taps (4*Q*L*P) per value token S the value gradient sorts points by patch (fewer, larger
# keys) instead of sorting the taps (measured on 2 CPU cores: taps win at 28 taps per token, patches at 64).
_TAPS_PER_ROW_FOR_PATCHES = 40


def _point_offsets(B: int, Q: int, M: int, rows_per_image, device, dtype) -> torch.Tensor:
    """[B*Q*M] row offset b*rows_per_image*M + m of the bag n = (b, q, m)."""
    b = torch.arange(B, device=device, dtype=dtype).view(B, 1, 1) * (rows_per_image * M)
    m = torch.arange(M, device=device, dtype=dtype).view(1, 1, M)
    return (b + m).expand(B, Q, M).reshape(B * Q * M)


def _padded_geometry(spatial_shapes: torch.Tensor, dtype: torch.dtype):
    """(padded width W_l+2 [L], padded level start [L], padded rows per image Spad (0-dim)) for maps with a
    1-pixel border (coords -1..H_l, -1..W_l)."""
    shapes = spatial_shapes.to(dtype)
    pw = shapes[:, 1] + 2
    psize = (shapes[:, 0] + 2) * pw
    return pw, psize.cumsum(0) - psize, psize.sum()


def corner_taps(num_tokens: int, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                index_dtype: torch.dtype = torch.int64, with_patches: bool = False) -> dict:
    """Row indices and weights of the 4 bilinear taps of every sampling point (no autograd).

    num_tokens: S (value tokens per image); spatial_shapes: int [L,2] (H,W); level_start_index: int [L];
    sampling_locations: [B,Q,M,L,P,2] (x,y) in [0,1]; attention_weights: [B,Q,M,L,P].
    With N = B*Q*M bags n = (b,q,m), K = L*P points k = (l,p) and taps ordered (dy, dx, k), returns a dict:

    - ``rows`` [N,4K] ``index_dtype``: row ``(b*S + start_l + y*W_l + x)*M + m`` of ``value.view(B*S*M, D)``
      (taps outside the map get a clamped, valid row) and ``taps`` [N,4K] its weight: bilinear weight x
      inside-the-map x attention weight;
    - point-minor copies for the backward: ``taps_t`` [4, K*N] (corner-major, point i = k*N + n);
      ``w0``, ``w1`` [K,2,N]: per-axis (x, y) weights (1-frac, frac) of the lower/upper tap, zeroed outside
      the map; ``in0``, ``in1`` bool [K,2,N]: whether that tap is inside; ``aw_t`` [K,N];
    - ``patches`` [K*N] or None (``with_patches``): row of each point's top-left tap in the bordered table
      of :func:`_padded_geometry`.
    """
    B, Q, M, L, P, _ = sampling_locations.shape
    N, K = B * Q * M, L * P
    dtype, dev = sampling_locations.dtype, sampling_locations.device
    # Point-minor layout [K, axis, N]: every elementwise op runs along the N bags, contiguous, with the
    # per-(level, point, axis) constants broadcast over it. (In the natural [N,K,2] layout the 2- and
    # 16-long inner loops and the x/y de-interleaving cost ~3x more.) In-place ops keep temporaries few.
    frac = sampling_locations.reshape(N, 2 * K).t().contiguous().view(K, 2, N)
    size = spatial_shapes.flip(-1).to(dtype).repeat_interleave(P, dim=0).unsqueeze(-1)  # [K,2,1] (W,H)
    zero, hi = torch.zeros_like(size), size - 1
    frac.mul_(size).sub_(0.5)  # continuous pixel coords
    p0 = frac.floor()
    frac.sub_(p0)
    c0 = torch.clamp(p0, zero, hi)
    in0 = c0 == p0  # a tap is inside the map iff clamping left it unchanged
    patches = None
    if with_patches:
        # top-left tap clamped to [-1, size-1] (beyond, all 4 weights are 0), +1 for the border
        base = torch.clamp(p0, zero - 1, hi).to(index_dtype).add_(1)  # [K,2,N]
        pw, pstart, spad = _padded_geometry(spatial_shapes, index_dtype)
        pw, pstart = pw.repeat_interleave(P).view(K, 1), pstart.repeat_interleave(P).view(K, 1)
        patches = (base[:, 1] * (pw * M)).add_(base[:, 0] * M).add_(pstart * M).add_(
            _point_offsets(B, Q, M, spad, dev, index_dtype)).view(K * N)
        del base
    p1 = p0.add_(1)
    c1 = torch.clamp(p1, zero, hi)
    in1 = c1 == p1
    del p0, p1
    w1 = frac * in1
    w0 = frac.neg_().add_(1).mul_(in0)
    del frac
    aw_t = attention_weights.reshape(N, K).t().contiguous()  # [K,N]
    wx = torch.stack((w0[:, 0], w1[:, 0]))  # [2,K,N] weights of columns x0, x0+1
    wy = torch.stack((w0[:, 1], w1[:, 1])).mul_(aw_t)  # [2,K,N] lines y0, y0+1, attention folded in
    taps_t = (wy.unsqueeze(1) * wx.unsqueeze(0)).view(4 * K, N)  # [(dy,dx,k), n]
    del wx, wy

    width = spatial_shapes[:, 1].to(index_dtype).repeat_interleave(P).view(K, 1)
    start = level_start_index.to(index_dtype).repeat_interleave(P).view(K, 1)
    x_part = torch.stack((c0[:, 0], c1[:, 0])).to(index_dtype).mul_(M).add_(
        _point_offsets(B, Q, M, num_tokens, dev, index_dtype))  # [2,K,N]
    y_part = torch.stack((c0[:, 1], c1[:, 1])).to(index_dtype).mul_(width * M).add_(start * M)
    del c0, c1
    rows = (y_part.unsqueeze(1) + x_part.unsqueeze(0)).view(4 * K, N).t().contiguous()  # [N,4K]
    return dict(rows=rows, taps=taps_t.t().contiguous(), taps_t=taps_t.view(4, K * N), w0=w0, w1=w1,
                in0=in0, in1=in1, aw_t=aw_t, patches=patches)


def _interior_rows(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, B: int, S: int, M: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """[B*S*M, 4]: for value row (b,s,m) and tap c = (dy,dx), the bordered-table row of the patch whose
    corner c is token s (i.e. token s shifted by (-dy,-dx))."""
    dev = spatial_shapes.device
    shapes = spatial_shapes.to(dtype)
    W = shapes[:, 1]
    level = torch.repeat_interleave(torch.arange(len(shapes), device=dev), shapes.prod(1), output_size=S)
    local = torch.arange(S, device=dev, dtype=dtype) - level_start_index.to(dtype)[level]
    y = torch.div(local, W[level], rounding_mode="floor")
    x = local - y * W[level]
    pw, pstart, spad = _padded_geometry(spatial_shapes, dtype)
    dy = torch.tensor([0, 0, 1, 1], device=dev, dtype=dtype)
    dx = torch.tensor([0, 1, 0, 1], device=dev, dtype=dtype)
    pos = (pstart[level] + (y + 1) * pw[level] + x + 1).view(S, 1) - dy * pw[level].view(S, 1) - dx  # [S,4]
    b = torch.arange(B, device=dev, dtype=dtype).view(B, 1, 1, 1) * spad
    m = torch.arange(M, device=dev, dtype=dtype).view(1, 1, M, 1)
    return ((b + pos.view(1, S, 1, 4)) * M + m).reshape(B * S * M, 4)


def _grad_table(grad_out, taps_t, patches, spatial_shapes, level_start_index, B, S, M):
    """Value gradient [B*S*M, D]: grad[r] = sum over taps hitting row r of tap weight * grad_out[bag].

    grad_out [N,D]; taps_t [4, K*N] and patches [K*N] as from :func:`corner_taps`. Sorting the points by
    patch row groups, for each corner c = (dy,dx), the taps by destination row (patch row + a per-level
    shift). One weighted embedding_bag over grad_out sums, per corner and patch row, the contributions
    G [4*R', D]; a second one adds, for every token, the 4 entries of G that land on it.
    """
    N, D = grad_out.shape
    KN = patches.shape[0]
    idt = patches.dtype
    sorted_rows, perm = patches.sort()
    _, _, spad = _padded_geometry(spatial_shapes, idt)
    R = B * int(spad) * M  # rows of the bordered table
    counts = torch.bincount(sorted_rows, minlength=R)
    first = counts.cumsum(0) - counts  # first sorted point of each patch row
    offsets = (first + torch.arange(4, device=first.device).view(4, 1) * KN).reshape(4 * R).to(idt)
    bags = torch.remainder(perm, N).to(idt).repeat(4)  # point i = k*N + n belongs to bag n
    G = F.embedding_bag(bags, grad_out, offsets, per_sample_weights=taps_t.index_select(1, perm).view(-1),
                        mode="sum")  # [4R, D]
    dest = _interior_rows(spatial_shapes, level_start_index, B, S, M, idt)
    dest = dest + torch.arange(4, device=dest.device, dtype=idt) * R  # corner c's block of G
    return F.embedding_bag(dest, G, mode="sum")


def _grad_table_by_taps(grad_out, rows, taps, num_rows):
    """Value gradient [num_rows, D] for few taps: sort the N*4K taps (rows/taps [N,4K]) by value row, then
    one weighted embedding_bag over grad_out [N,D] with one bag per value row."""
    N, J = rows.shape
    sorted_rows, perm = rows.reshape(-1).sort()
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    offsets = (counts.cumsum(0) - counts).to(rows.dtype)
    bags = torch.div(perm, J, rounding_mode="floor").to(rows.dtype)
    return F.embedding_bag(bags, grad_out, offsets, per_sample_weights=taps.reshape(-1).index_select(0, perm),
                           mode="sum")


def _tap_dots(grad_out: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
              finite: torch.Tensor) -> torch.Tensor:
    """s[n,j] = <grad_out[n], table[rows[n,j]]> ([N,D], [R,D], [N,J] -> [N,J]) without gathering rows.
    ``finite``: any finite tensor of N*J elements in grad_out's dtype (scratch values for the sparse
    pattern; sampled_addmm reads them even with beta=0).

    Eagerly a sampled dense-dense product (CSR pattern = the taps) is ~3x faster on CPU than ATen's
    per-sample-weights backward of embedding_bag, which serves the rest: other dtypes, patterns with more
    entries than the dense [N,R] matrix (tiny tables, which sampled_addmm rejects) and graph capture by
    torch.compile (sparse CSR tensors do not trace)."""
    N, J = rows.shape
    if table.dtype in (torch.float32, torch.float64) and J <= table.shape[0] \
            and not torch.compiler.is_compiling():
        crow = torch.arange(0, N * J + 1, J, device=rows.device, dtype=rows.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(crow, rows.reshape(-1), finite.reshape(N * J),
                                              size=(N, table.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, grad_out, table.t(), beta=0.0).values().view(N, J)
    offsets = torch.arange(0, N * J, J, device=rows.device, dtype=rows.dtype)
    bag_of = torch.arange(N, device=rows.device, dtype=rows.dtype).repeat_interleave(J)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_out, table, rows.reshape(-1), offsets, bag_of, 0).view(N, J)


def _point_grads(s, w0, w1, in0, in1, aw_t, spatial_shapes, P):
    """Closed-form chain rule from the tap gradients to the points, in the point-minor layout.

    s [2,2,K,N]: d loss / d tap weight for taps (dy,dx,k,n); w0, w1 [K,2,N] per-axis tap weights,
    in0, in1 their inside masks, aw_t [K,N] attention weights. A tap weight is aw * wy[dy] * wx[dx] with
    w0 = (1-frac)*in0, w1 = frac*in1 and frac = loc*size - 0.5 - floor(..). Returns (grad_aw [K,N],
    grad_loc [K,2,N]).
    """
    wx0, wx1, wy0, wy1 = w0[:, 0], w1[:, 0], w0[:, 1], w1[:, 1]  # [K,N]
    grad_aw = wy0 * (wx0 * s[0, 0] + wx1 * s[0, 1]) + wy1 * (wx0 * s[1, 0] + wx1 * s[1, 1])  # the sample
    # d w0 / d frac = -in0, d w1 / d frac = in1
    gx = wy0 * (in1[:, 0] * s[0, 1] - in0[:, 0] * s[0, 0]) + wy1 * (in1[:, 0] * s[1, 1] - in0[:, 0] * s[1, 0])
    gy = wx0 * (in1[:, 1] * s[1, 0] - in0[:, 1] * s[0, 0]) + wx1 * (in1[:, 1] * s[1, 1] - in0[:, 1] * s[0, 1])
    K = aw_t.shape[0]
    size = spatial_shapes.flip(-1).to(aw_t.dtype).repeat_interleave(P, dim=0).view(K, 2, 1)  # d frac / d loc
    return grad_aw, torch.stack((gx, gy), 1).mul_(aw_t.unsqueeze(1)).mul_(size)


class _MSDeformAttnFused(torch.autograd.Function):
    """Forward: one weighted embedding_bag over all taps. Backward: value gradient by
    :func:`_grad_table_by_taps` or :func:`_grad_table`, tap gradients by :func:`_tap_dots`, then the
    closed-form chain rule :func:`_point_grads` to the locations and attention weights."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        # int32 indices halve the index traffic; int64 only for tables too large for it (the bordered
        # table of the backward has Spad = S + 2*sum(H_l+W_l) + 4L <= 3S + 6L rows per image and head)
        index_dtype = torch.int32 if B * (3 * S + 6 * L) * M < _INT32_MAX else torch.int64
        # taps in at least the locations' precision (half-precision pixel coordinates are too coarse)
        tap_dtype = torch.promote_types(sampling_locations.dtype, value.dtype)
        # Value gradient strategy (static in the shapes): with few taps per value row (decoder) sort the
        # taps themselves; with many (encoder) sort the 4x fewer points by 2x2 patch.
        by_patch = 4 * Q * L * P > _TAPS_PER_ROW_FOR_PATCHES * S
        t = corner_taps(S, spatial_shapes, level_start_index, sampling_locations.to(tap_dtype),
                        attention_weights.to(tap_dtype), index_dtype,
                        with_patches=ctx.needs_input_grad[0] and by_patch)
        table = value.reshape(B * S * M, D)
        taps = t["taps"].to(value.dtype)
        out = F.embedding_bag(t["rows"], table, per_sample_weights=taps, mode="sum")
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # tap weights in the layout the value gradient reads: point-minor by corner, or as the rows
            taps = t["taps_t"].to(value.dtype) if by_patch else taps
            ctx.save_for_backward(table, t["rows"], taps, t["patches"], spatial_shapes,
                                  level_start_index, t["w0"], t["w1"], t["in0"], t["in1"], t["aw_t"])
        ctx.by_patch = by_patch
        ctx.dims = (B, S, M, D, Q, L, P)
        ctx.dtypes = (sampling_locations.dtype, attention_weights.dtype)
        return out.view(B, Q, M * D)

    @staticmethod
    def backward(ctx, grad_out):
        table, rows, taps, patches, spatial_shapes, level_start_index, w0, w1, in0, in1, aw_t = \
            ctx.saved_tensors
        B, S, M, D, Q, L, P = ctx.dims
        N, K = B * Q * M, L * P
        grad_out = grad_out.reshape(N, D).contiguous()
        grad_value = grad_loc = grad_aw = None
        if ctx.needs_input_grad[0]:
            if ctx.by_patch:
                grad_value = _grad_table(grad_out, taps, patches, spatial_shapes, level_start_index, B, S, M)
            else:
                grad_value = _grad_table_by_taps(grad_out, rows, taps, B * S * M)
            grad_value = grad_value.view(B, S, M, D)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # s[dy,dx,k,n] = <grad_out[n], value row of tap (dy,dx,k)>, in the point-minor layout
            s = _tap_dots(grad_out, table, rows, taps).t().to(aw_t.dtype).contiguous().view(2, 2, K, N)
            grad_aw, grad_loc = _point_grads(s, w0, w1, in0, in1, aw_t, spatial_shapes, P)
            grad_aw = grad_aw.t().reshape(B, Q, M, L, P).to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
            grad_loc = grad_loc.view(2 * K, N).t().reshape(B, Q, M, L, P, 2).to(ctx.dtypes[0]) \
                if ctx.needs_input_grad[3] else None
        return grad_value, None, None, grad_loc, grad_aw


def ms_deform_attn_fused(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core, all levels and heads in one weighted gather.

    value: [B,S,M,D] (padding already zeroed); spatial_shapes: int64 [L,2] (H_l,W_l); level_start_index:
    int64 [L]; sampling_locations: [B,Q,M,L,P,2] (x,y), normally in [0,1] (outside the map -> zeros);
    attention_weights: [B,Q,M,L,P]. Returns [B,Q,M*D] in value's dtype (head m in channels m*D:(m+1)*D).
    Differentiable w.r.t. value, sampling_locations and attention_weights. NaN locations (a diverged
    model) give invalid row indices and embedding_bag raises an index error.
    """
    B, S, M, D = value.shape
    Bl, Q, Ml, L, P, two = sampling_locations.shape
    if (Bl, Ml, two) != (B, M, 2) or attention_weights.shape != sampling_locations.shape[:-1] \
            or spatial_shapes.shape != (L, 2) or level_start_index.shape != (L,):
        raise ValueError(
            "ms_deform_attn_fused: inconsistent shapes: value [B,S,M,D]=%s, sampling_locations "
            "[B,Q,M,L,P,2]=%s, attention_weights [B,Q,M,L,P]=%s, spatial_shapes [L,2]=%s, "
            "level_start_index [L]=%s" % (tuple(value.shape), tuple(sampling_locations.shape),
                                         tuple(attention_weights.shape), tuple(spatial_shapes.shape),
                                         tuple(level_start_index.shape)))
    return _MSDeformAttnFused.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)
