"""Multi-scale deformable attention: against a naive per-point bilinear loop, gradcheck, init, backends."""
import math

import pytest
import torch

from solq.models import deformable_attention as da
from solq.models.deformable_attention import MSDeformAttn, get_backend, ms_deform_attn_reference

SHAPES = [(5, 7), (3, 4), (1, 2)]


def _bilinear_zero_pad(img, x, y):
    """img [C,H,W]; continuous pixel coordinates (pixel centres at integers). Zero outside."""
    C, H, W = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(C, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * img[:, yy, xx]
    return out


def _naive(value, shapes, locations, weights):
    """Loop over batch, query, head, level, point. value [B,S,M,D] -> [B,Q,M*D]."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(D, h, w)
                    for p in range(P):
                        lx, ly = locations[b, q, m, lvl, p].tolist()
                        # align_corners=False: normalised 0..1 spans pixel edges, centres at i + 0.5
                        s = _bilinear_zero_pad(img, lx * w - 0.5, ly * h - 0.5)
                        out[b, q, m] += weights[b, q, m, lvl, p] * s
    return out.reshape(B, Q, M * D)


def _inputs(B=2, Q=3, M=2, D=3, P=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    L = len(SHAPES)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # include points outside [0,1] to exercise the zero padding
    locations = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return value, shapes, start, locations, weights


def test_reference_matches_naive_loop_float64():
    value, shapes, start, loc, w = _inputs()
    got = ms_deform_attn_reference(value, shapes, start, loc, w)
    want = _naive(value, SHAPES, loc, w)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_gradcheck():
    value, shapes, start, loc, w = _inputs(B=1, Q=2, M=2, D=2, P=2, seed=1)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_reference(v, shapes, start, l, a),
                                    (value, loc, w), eps=1e-6, atol=1e-5)


def test_module_locations_match_formula_and_weights_sum_to_one():
    torch.manual_seed(0)
    d, M, L, P, Q = 8, 2, len(SHAPES), 2, 4
    attn = MSDeformAttn(d, n_levels=L, n_heads=M, n_points=P).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _, shapes, start, _, _ = _inputs()
    S = int(shapes.prod(1).sum())
    query = torch.randn(2, Q, d, dtype=torch.float64)
    value = torch.randn(2, S, d, dtype=torch.float64)
    offsets = attn.sampling_offsets(query).view(2, Q, M, L, P, 2)
    wh = shapes.flip(-1).double()  # (W, H)

    ref2 = torch.rand(2, Q, L, 2, dtype=torch.float64)
    out, (loc, w) = attn(query, ref2, value, shapes, start, return_attention=True)
    assert out.shape == (2, Q, d) and loc.shape == (2, Q, M, L, P, 2) and w.shape == (2, Q, M, L, P)
    for lvl in range(L):  # point reference: offsets are in pixels of each level (same ops: bit-identical)
        assert torch.equal(loc[:, :, :, lvl], ref2[:, :, None, lvl, None] + offsets[:, :, :, lvl] / wh[lvl])
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(2, Q, M, dtype=torch.float64))

    ref4 = torch.rand(2, Q, L, 4, dtype=torch.float64) * 0.5 + 0.1
    _, (loc4, _) = attn(query, ref4, value, shapes, start, return_attention=True)
    want = ref4[:, :, None, :, None, :2] + offsets / P * ref4[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(loc4, want)


def test_module_padding_values_are_ignored():
    torch.manual_seed(0)
    d, L = 8, len(SHAPES)
    attn = MSDeformAttn(d, n_levels=L, n_heads=2, n_points=2).double()
    _, shapes, start, _, _ = _inputs()
    S = int(shapes.prod(1).sum())
    query = torch.randn(1, 3, d, dtype=torch.float64)
    value = torch.randn(1, S, d, dtype=torch.float64)
    pad = torch.rand(1, S) < 0.3
    ref = torch.rand(1, 3, L, 2, dtype=torch.float64)
    a = attn(query, ref, value, shapes, start, pad)
    b = attn(query, ref, value.masked_fill(pad[..., None], 1e3), shapes, start, pad)
    torch.testing.assert_close(a, b)


def test_init_directions_and_uniform_weights():
    M, L, P = 8, 4, 4
    attn = MSDeformAttn(32, n_levels=L, n_heads=M, n_points=P)
    bias = attn.sampling_offsets.bias.view(M, L, P, 2)
    assert torch.all(attn.sampling_offsets.weight == 0)
    assert torch.all(attn.attention_weights.weight == 0) and torch.all(attn.attention_weights.bias == 0)
    for h in range(M):
        theta = 2 * math.pi * h / M
        unit = torch.tensor([math.cos(theta), math.sin(theta)])
        unit = unit / unit.abs().max()
        for p in range(P):
            for lvl in range(L):
                torch.testing.assert_close(bias[h, lvl, p], unit * (p + 1))
    assert torch.all(attn.value_proj.bias == 0) and torch.all(attn.output_proj.bias == 0)


def test_autocast_keeps_sampling_in_float32():
    torch.manual_seed(0)
    attn = MSDeformAttn(16, n_levels=len(SHAPES), n_heads=2, n_points=2)
    _, shapes, start, _, _ = _inputs()
    S = int(shapes.prod(1).sum())
    query, value = torch.randn(2, 3, 16), torch.randn(2, S, 16)
    ref = torch.rand(2, 3, len(SHAPES), 2)
    want = attn(query, ref, value, shapes, start)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (loc, w) = attn(query, ref, value, shapes, start, return_attention=True)
    assert loc.dtype == torch.float32 and w.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_backend_registry(monkeypatch):
    from solq.models.msda_fused import ms_deform_attn_fused
    from solq.models.msda_triton import ms_deform_attn_auto

    assert get_backend("reference") is ms_deform_attn_reference
    assert get_backend("fused") is ms_deform_attn_fused
    assert get_backend("auto") is ms_deform_attn_auto
    with pytest.raises(ValueError, match="registered"):
        get_backend("cuda-op")
    calls = []

    def fake(*args):
        calls.append(1)
        return ms_deform_attn_reference(*args)

    monkeypatch.setitem(da.BACKENDS, "mine", fake)  # registering a backend is one dict entry
    assert get_backend("mine") is fake
    attn = MSDeformAttn(8, n_levels=len(SHAPES), n_heads=2, n_points=1, backend="mine")
    _, shapes, start, _, _ = _inputs()
    S = int(shapes.prod(1).sum())
    attn(torch.randn(1, 2, 8), torch.rand(1, 2, len(SHAPES), 2), torch.randn(1, S, 8), shapes, start)
    assert calls == [1]


def test_auto_backend_equals_reference_in_the_module():
    """The default backend (auto: fused on CPU) gives the reference's outputs and gradients."""
    torch.manual_seed(0)
    ref = MSDeformAttn(16, n_levels=len(SHAPES), n_heads=2, n_points=2, backend="reference")
    auto = MSDeformAttn(16, n_levels=len(SHAPES), n_heads=2, n_points=2, backend="auto")
    auto.load_state_dict(ref.state_dict())
    _, shapes, start, _, _ = _inputs()
    S = int(shapes.prod(1).sum())
    query, refs, value = torch.randn(2, 5, 16), torch.rand(2, 5, len(SHAPES), 2), torch.randn(2, S, 16)
    out_ref, out_auto = ref(query, refs, value, shapes, start), auto(query, refs, value, shapes, start)
    torch.testing.assert_close(out_auto, out_ref, atol=1e-5, rtol=1e-5)
    out_ref.square().sum().backward()
    out_auto.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), auto.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_decoder_self_attention_runs_through_scaled_dot_product_attention(training, masked):
    """The decoder's self-attention is nn.MultiheadAttention with need_weights=False, which PyTorch dispatches
    to scaled_dot_product_attention (fused kernels; no [B,M,Q,Q] weights returned), with and without the query
    group mask and in training (dropout) as in evaluation."""
    from torch.profiler import profile

    from solq.models.transformer import DeformableDecoderLayer

    torch.manual_seed(0)
    layer = DeformableDecoderLayer(d_model=32, d_ffn=64, n_levels=1, n_heads=4, n_points=2).train(training)
    B, Q = 2, 6
    tgt, pos = torch.randn(B, Q, 32), torch.randn(B, Q, 32)
    ref = torch.rand(B, Q, 1, 2)
    memory = torch.randn(B, 12, 32)
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])
    attn_mask = torch.zeros(Q, Q, dtype=torch.bool)
    attn_mask[:3, 3:] = attn_mask[3:, :3] = True  # two groups of queries that do not see each other
    with profile() as prof:
        out, _ = layer(tgt, pos, ref, memory, shapes, starts, None, self_attn_mask=attn_mask if masked else None)
    names = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in names
    assert out.shape == (B, Q, 32) and torch.isfinite(out).all()
