"""Fused multi-scale deformable attention sampling in plain PyTorch (any device; the CPU fast path).

Same signature and semantics as ``msda_reference.ms_deform_attn_reference``: for each
(b, q, m, l, p) sample level l of head m bilinearly at pixel coordinates (x*W_l - 0.5, y*H_l - 0.5), each of
the 4 corner taps contributing only when it lies inside the map (zero padding, align_corners=False),
multiply by the attention weight and sum over levels and points.

Instead of one ``grid_sample`` per level followed by a stack and a weighted sum, all levels and heads are
handled at once:

- ``value`` is copied into a *bordered table*: every level gets a 1-pixel frame of zero rows, and the table
  is viewed as B*Spad*M rows of length D (head m of token t is row t*M + m). A point's 4 bilinear taps are
  then its top-left row r and r + M, r + Wpad*M, r + Wpad*M + M, whatever the point's position: taps that
  fall outside the map read a zero row, so no inside-the-map masks are needed; points farther out are
  clamped onto the frame (all their taps read zeros);
- every sampling point becomes 4 taps (row index; bilinear weight x attention weight), built with a
  handful of elementwise ops on [N, K] tensors (N = B*Q*M bags, K = L*P points, no transposes), and ONE
  ``embedding_bag`` (a fused weighted row sum) computes each output vector from its 4*K taps. Nothing of
  size [..., 4*K, D] is materialised.

Forward and backward are one custom autograd function (autograd's own embedding_bag backward costs ~10x
the forward here, and autograd through the tap construction ~3x the hand-written chain rule):

- value gradient = the transposed problem: taps sorted by table row make it one more ``embedding_bag``
  over the output gradient (one bag per row). With many taps per value token (the encoder, 64) the 4x
  fewer points are sorted instead, by top-left row, which groups each corner's taps by destination; two
  ``embedding_bag`` calls (points -> rows per corner -> tokens) finish it;
- tap-weight gradient = one dot product <grad_out, table row> per tap (a sampled dense-dense product),
  from which the location and attention-weight gradients follow in closed form with a few elementwise ops
  on [N, K] tensors (zero rows make the border taps' terms vanish by themselves).

No Python loops over levels, heads or points. Under ``torch.compile`` the function defers to the
``grid_sample`` formulation (the table's size depends on the values of ``spatial_shapes``, which a traced
graph cannot have); that formulation reads the level sizes as Python ints, so a compiled model's graph
breaks once per attention layer (README, "torch.compile").
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .msda_reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn_fused", "bilinear_points", "bilinear_taps", "bordered_table"]

_INT32_MAX = 2**31 - 1
# Above this many taps (4*Q*L*P) per value token S the value gradient sorts points by top-left row (fewer
# keys) instead of sorting the taps (measured on 2 CPU cores: taps win at 28 taps per token, points at 64).
_TAPS_PER_ROW_FOR_PATCHES = 40


def _padded_geometry(spatial_shapes: torch.Tensor, dtype: torch.dtype):
    """(padded width W_l+2 [L], padded level start [L], padded tokens per image Spad (0-dim)) of the maps
    with a 1-pixel border (coords -1..H_l, -1..W_l)."""
    shapes = spatial_shapes.to(dtype)
    pw = shapes[:, 1] + 2
    psize = (shapes[:, 0] + 2) * pw
    return pw, psize.cumsum(0) - psize, psize.sum()


def _token_positions(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of every value token in the bordered layout [S], padded width of its level [S])."""
    dev = spatial_shapes.device
    shapes = spatial_shapes.to(dtype)
    W = shapes[:, 1]
    level = torch.repeat_interleave(torch.arange(len(shapes), device=dev), shapes.prod(1), output_size=S)
    local = torch.arange(S, device=dev, dtype=dtype) - level_start_index.to(dtype)[level]
    y = torch.div(local, W[level], rounding_mode="floor")
    x = local - y * W[level]
    pw, pstart, _ = _padded_geometry(spatial_shapes, dtype)
    return pstart[level] + (y + 1) * pw[level] + x + 1, pw[level]


def bordered_table(value: torch.Tensor, spatial_shapes: torch.Tensor,
                   level_start_index: torch.Tensor) -> torch.Tensor:
    """value [B,S,M,D] -> [B*Spad*M, D]: the levels framed by one pixel of zeros (Spad = sum (H+2)(W+2))."""
    B, S, M, D = value.shape
    pos, _ = _token_positions(spatial_shapes, level_start_index, S, torch.int64)
    _, _, spad = _padded_geometry(spatial_shapes, torch.int64)
    table = value.new_zeros(B, int(spad), M, D)
    table.index_copy_(1, pos, value)
    return table.view(-1, D)


def bilinear_points(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                    spatial_shapes: torch.Tensor, index_dtype: torch.dtype = torch.int64,
                    with_valid: bool = False) -> dict:
    """Where each sampling point reads the bordered table, and its bilinear fractions (no autograd).

    sampling_locations: [B,Q,M,L,P,2] (x,y), normally in [0,1]; attention_weights: [B,Q,M,L,P];
    spatial_shapes: int [L,2] (H,W). With N = B*Q*M bags n = (b,q,m) and K = L*P points k = (l,p), returns a
    dict of [N,K] tensors: ``top_left`` (``index_dtype``) the row ``(b*Spad + pos)*M + m`` of
    :func:`bordered_table` of the point's top-left tap; ``fx``, ``fy`` the fractional offsets from it and
    ``aw`` the attention weights, in the locations' dtype (at least float32); with ``with_valid`` also
    ``valid_x``, ``valid_y`` (bool): False where the point was clamped onto the frame (there the sample is
    constantly 0, so it has no gradient).
    """
    B, Q, M, L, P, _ = sampling_locations.shape
    N, K = B * Q * M, L * P
    dev = sampling_locations.device
    # coordinates in at least float32: the top-left position is formed exactly in this dtype (< Spad)
    dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    loc = sampling_locations.reshape(N, K, 2).to(dtype)
    size = spatial_shapes.to(dtype).flip(-1).repeat_interleave(P, dim=0)  # [K,2] (W,H) of each point's level
    pw, pstart, spad = _padded_geometry(spatial_shapes, dtype)
    pw_k = pw.repeat_interleave(P)
    minus_one = torch.full_like(pw_k, -1.0)
    half = torch.tensor(-0.5, dtype=dtype, device=dev)
    out = {}
    corners = []
    for axis, name in ((0, "x"), (1, "y")):  # [N,K] contiguous planes (reading the interleaved input once)
        extent = size[:, axis]
        pix = torch.addcmul(half, loc[..., axis], extent)  # pixel coordinate, centres at integers
        if with_valid:
            # the floor convention of grid_sample: the last cell with a tap inside is [W-1, W)
            out["valid_" + name] = (pix >= minus_one).logical_and_(pix < extent)
        pix.clamp_(minus_one, extent)  # farther out, every tap is on the zero frame
        p0 = pix.floor()
        torch.minimum(p0, extent - 1, out=p0)  # pix == W: top-left W-1 with fraction 1 (reads the frame)
        out["f" + name] = pix.sub_(p0)
        corners.append(p0)
    x0, y0 = corners
    pos = torch.addcmul(x0, y0, pw_k).add_(pstart.repeat_interleave(P) + pw_k + 1)  # bordered position
    del x0, y0, corners
    nb = (torch.arange(B, device=dev, dtype=index_dtype).view(B, 1, 1) * (int(spad) * M)
          + torch.arange(M, device=dev, dtype=index_dtype).view(1, 1, M)).expand(B, Q, M).reshape(N, 1)
    out["top_left"] = pos.to(index_dtype).mul_(M).add_(nb)
    out["aw"] = attention_weights.reshape(N, K).to(dtype)
    return out


def bilinear_taps(top_left: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, aw: torch.Tensor,
                  spatial_shapes: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 taps of every point of :func:`bilinear_points` ([N,K] each; M heads).

    Returns (rows [N,4,K] in top_left's dtype, weights [N,4,K] = bilinear weight x attention weight) for the
    corners c = (dy,dx) in the order (0,0), (0,1), (1,0), (1,1): rows top_left + (0, M, Wpad*M, Wpad*M + M).
    """
    K = top_left.shape[1]
    pw, _, _ = _padded_geometry(spatial_shapes, top_left.dtype)
    step = pw.repeat_interleave(K // len(pw)) * M  # [K]
    corner = torch.stack((torch.zeros_like(step), torch.full_like(step, M), step, step + M))  # [4,K]
    rows = top_left.unsqueeze(1) + corner
    wy1 = aw * fy
    wy0 = aw - wy1
    t01, t11 = wy0 * fx, wy1 * fx
    return rows, torch.stack((wy0.sub_(t01), t01, wy1.sub_(t11), t11), 1)


def _row_of(flat_index: torch.Tensor, width: int) -> torch.Tensor:
    """flat_index // width for non-negative integer indices (a shift when width is a power of 2: integer
    division is several times slower on CPU)."""
    if width & (width - 1) == 0:
        return flat_index >> (width.bit_length() - 1)
    return torch.div(flat_index, width, rounding_mode="floor")


def _grad_table_by_points(grad_out, top_left, taps, spatial_shapes, level_start_index, B, S, M):
    """Value gradient [B*S*M, D] for many taps per token.

    grad_out [N,D]; top_left [N,K] from :func:`bilinear_points`, taps [N,4,K] from :func:`bilinear_taps`.
    Sorting the N*K points by top-left row groups, for each corner c, the taps by destination row (top-left +
    the corner's step). One weighted embedding_bag over grad_out sums, per corner and table row, the
    contributions G [4R, D]; a second one adds, for every token, the 4 entries of G that land on it.
    """
    N, D = grad_out.shape
    K = top_left.shape[1]
    idt = top_left.dtype
    sorted_rows, perm = top_left.reshape(-1).sort(stable=True)
    _, _, spad = _padded_geometry(spatial_shapes, idt)
    R = B * int(spad) * M  # rows of the bordered table
    counts = torch.bincount(sorted_rows, minlength=R)
    first = counts.cumsum(0) - counts  # first sorted point of each top-left row
    NK = N * K
    offsets = (first + torch.arange(4, device=first.device).view(4, 1) * NK).reshape(4 * R).to(idt)
    bag = _row_of(perm, K)  # point i = n*K + k belongs to bag n
    # the taps corner-major [4,NK] (one copy), then the same gather of the sorted points in each corner's row:
    # half the time of one gather through a [4,NK] int64 index built for it (14 against 26 ms per encoder layer)
    weights = taps.view(N, 4, K).permute(1, 0, 2).reshape(4, NK).index_select(1, perm).view(-1)
    G = F.embedding_bag(bag.to(idt).repeat(4), grad_out, offsets, per_sample_weights=weights, mode="sum")
    pos, pw = _token_positions(spatial_shapes, level_start_index, S, idt)
    shift = torch.tensor([0, 0, 1, 1], device=pos.device, dtype=idt) * pw.view(S, 1) \
        + torch.tensor([0, 1, 0, 1], device=pos.device, dtype=idt)  # [S,4]: token = top-left + shift
    b = torch.arange(B, device=pos.device, dtype=idt).view(B, 1, 1, 1) * spad
    m = torch.arange(M, device=pos.device, dtype=idt).view(1, 1, M, 1)
    dest = ((b + (pos.view(S, 1) - shift).view(1, S, 1, 4)) * M + m).reshape(B * S * M, 4)
    dest = dest + torch.arange(4, device=dest.device, dtype=idt) * R  # corner c's block of G
    return F.embedding_bag(dest, G, mode="sum")


def _grad_table_by_taps(grad_out, rows, taps, num_rows):
    """Value gradient [num_rows, D] for few taps: sort the N*J taps (rows/taps [N,J]) by table row, then
    one weighted embedding_bag over grad_out [N,D] with one bag per table row."""
    N, J = rows.shape
    sorted_rows, perm = rows.reshape(-1).sort(stable=True)
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    offsets = (counts.cumsum(0) - counts).to(rows.dtype)
    bags = _row_of(perm, J).to(rows.dtype)
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
    if not torch.compiler.is_compiling() and table.dtype in (torch.float32, torch.float64) \
            and J <= table.shape[0]:
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


def _point_grads(s: torch.Tensor, fx, fy, aw, dx, dy) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form chain rule from the tap gradients to the points.

    s [N,4,K]: d loss / d tap weight for corners (dy,dx) = (0,0), (0,1), (1,0), (1,1); fx, fy, aw [N,K] as
    from :func:`bilinear_points`; dx, dy [N,K]: d pixel coordinate / d location (the map's size, 0 where the
    point was clamped). A tap weight is aw * wy * wx with (wx0, wx1) = (1-fx, fx) and
    likewise in y. Returns (grad_aw [N,K], grad_loc [N,K,2]).
    """
    s00, s01, s10, s11 = s.unbind(1)
    d0, d1 = s01 - s00, s11 - s10  # d/dfx of the upper and lower line
    h0 = torch.addcmul(s00, fx, d0)  # the lines interpolated along x
    gy = torch.addcmul(s10, fx, d1).sub_(h0)
    grad_aw = torch.addcmul(h0, fy, gy)  # the bilinear sample itself
    gx = torch.addcmul(d0, fy, d1.sub_(d0))
    gx.mul_(aw).mul_(dx)
    gy.mul_(aw).mul_(dy)
    return grad_aw, torch.stack((gx, gy), -1)


class _MSDeformAttnFused(torch.autograd.Function):
    """Forward: one weighted embedding_bag over all taps of the bordered table. Backward: value gradient by
    :func:`_grad_table_by_taps` or :func:`_grad_table_by_points`, tap gradients by :func:`_tap_dots`, then
    the closed-form chain rule :func:`_point_grads` to the locations and attention weights."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        N, K = B * Q * M, L * P
        # int32 indices halve the index traffic; int64 only for tables too large for it (the bordered
        # table has Spad = S + 2*sum(H_l+W_l) + 4L <= 3S + 6L rows per image and head)
        index_dtype = torch.int32 if B * (3 * S + 6 * L) * M < _INT32_MAX else torch.int64
        grad_points = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        pts = bilinear_points(sampling_locations, attention_weights, spatial_shapes, index_dtype,
                              with_valid=grad_points)
        table = bordered_table(value, spatial_shapes, level_start_index)
        rows, taps = bilinear_taps(pts["top_left"], pts["fx"], pts["fy"], pts["aw"], spatial_shapes, M)
        out = F.embedding_bag(rows.view(N, 4 * K), table, per_sample_weights=taps.view(N, 4 * K).to(value.dtype),
                              mode="sum")
        if any(ctx.needs_input_grad):
            # only the [N,K] point terms are kept (the [N,4K] taps are rebuilt): 4x less memory per layer
            ctx.save_for_backward(table, spatial_shapes, level_start_index,
                                  *(pts.get(k) for k in ("top_left", "fx", "fy", "aw", "valid_x", "valid_y")))
        # value gradient strategy (static in the shapes): few taps per token (decoder) -> sort the taps;
        # many (encoder) -> sort the 4x fewer points by top-left row
        ctx.by_points = 4 * Q * L * P > _TAPS_PER_ROW_FOR_PATCHES * S
        ctx.dims = (B, S, M, D, Q, L, P)
        ctx.dtypes = (sampling_locations.dtype, attention_weights.dtype)
        return out.view(B, Q, M * D)

    @staticmethod
    def backward(ctx, grad_out):
        table, spatial_shapes, level_start_index, top_left, fx, fy, aw, valid_x, valid_y = ctx.saved_tensors
        B, S, M, D, Q, L, P = ctx.dims
        N, K = B * Q * M, L * P
        grad_out = grad_out.reshape(N, D).contiguous()
        rows, taps = bilinear_taps(top_left, fx, fy, aw, spatial_shapes, M)
        taps = taps.to(table.dtype)
        grad_value = grad_loc = grad_aw = None
        if ctx.needs_input_grad[0]:
            if ctx.by_points:
                grad_value = _grad_table_by_points(grad_out, top_left, taps, spatial_shapes,
                                                   level_start_index, B, S, M)
            else:
                grad_table = _grad_table_by_taps(grad_out, rows.view(N, 4 * K), taps.view(N, 4 * K),
                                                 table.shape[0]).view(B, -1, M, D)
                pos, _ = _token_positions(spatial_shapes, level_start_index, S, torch.int64)
                grad_value = grad_table.index_select(1, pos)
            grad_value = grad_value.view(B, S, M, D)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            s = _tap_dots(grad_out, table, rows.view(N, 4 * K), taps).to(aw.dtype).view(N, 4, K)
            size = spatial_shapes.to(aw.dtype).flip(-1).repeat_interleave(P, dim=0)  # d pixel / d location
            grad_aw, grad_loc = _point_grads(s, fx, fy, aw, valid_x * size[:, 0], valid_y * size[:, 1])
            grad_aw = grad_aw.view(B, Q, M, L, P).to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
            grad_loc = grad_loc.view(B, Q, M, L, P, 2).to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
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
    if torch.compiler.is_compiling():
        # The bordered table's size depends on the values of spatial_shapes, which a traced graph cannot
        # have; the grid_sample formulation traces (with a graph break where it reads the level sizes).
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    return _MSDeformAttnFused.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)
