"""DCT codec against scipy and the reference's zig-zag (reference §3.1-§3.3)."""
import numpy as np
import pytest
import scipy.fft
import torch

from solq.coding import DCTCodec, dct_matrix, zigzag_order


def _walk_zigzag(n):
    """Independent reference: walk the JPEG zig-zag cell by cell, bouncing off the borders."""
    u = v = 0
    out = [(0, 0)]
    up = True  # moving up-right (u decreases, v increases)
    while len(out) < n * n:
        if up:
            if v == n - 1:
                u += 1
                up = False
            elif u == 0:
                v += 1
                up = False
            else:
                u, v = u - 1, v + 1
        else:
            if u == n - 1:
                v += 1
                up = True
            elif v == 0:
                u += 1
                up = True
            else:
                u, v = u + 1, v - 1
        out.append((u, v))
    return out


def _random_masks(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, n, n, generator=g, dtype=torch.float64) > 0.5).double()


def test_zigzag_first_entries_match_reference():
    expected = [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0), (4, 0), (3, 1)]
    assert [tuple(p) for p in zigzag_order(128)[:12].tolist()] == expected


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_zigzag_equals_walk(n):
    assert [tuple(p) for p in zigzag_order(n).tolist()] == _walk_zigzag(n)


def test_kept_256_positions_are_the_triangle_plus_three():
    kept = [tuple(p) for p in DCTCodec(128, 256).positions.tolist()]
    triangle = {(u, v) for u in range(22) for v in range(22) if u + v <= 21}
    assert len(triangle) == 253
    assert set(kept[:253]) == triangle
    assert kept[253:] == [(22, 0), (21, 1), (20, 2)]


def test_dct_matrix_is_orthonormal_dct2():
    d = dct_matrix(16)
    assert torch.allclose(d @ d.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    x = np.random.default_rng(0).standard_normal((16, 16))
    assert np.allclose((d @ torch.from_numpy(x) @ d.T).numpy(), scipy.fft.dctn(x, norm="ortho"), atol=1e-12)


@pytest.mark.parametrize("n,nk", [(128, 256), (64, 128), (16, 40), (7, 49)])
def test_encode_equals_scipy_dctn_then_zigzag(n, nk):
    masks = _random_masks(5, n)
    codec = DCTCodec(n, nk)
    coeffs = scipy.fft.dctn(masks.numpy(), axes=(1, 2), norm="ortho")
    uv = zigzag_order(n)[:nk]
    expected = coeffs[:, uv[:, 0], uv[:, 1]]
    got = codec.encode(masks)
    assert got.dtype == torch.float64 and got.shape == (5, nk)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10, rtol=0)  # in fact exact up to rounding


def test_dc_term_of_rectangle():
    m = torch.zeros(1, 128, 128, dtype=torch.float64)
    m[0, 10:70, 20:100] = 1  # 80 x 60 rectangle: C[0,0] = sum / 128 = 37.5 (reference §3.1)
    assert DCTCodec().encode(m)[0, 0].item() == pytest.approx(37.5, abs=1e-9)


@pytest.mark.parametrize("n", [8, 16])
def test_decode_inverts_encode_with_all_coefficients(n):
    codec = DCTCodec(n, n * n)
    x = torch.rand(4, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(codec.decode(codec.encode(x)), x, atol=1e-12)


def test_decode_equals_scipy_idctn_of_zero_filled_grid():
    n, nk = 64, 100
    codec = DCTCodec(n, nk)
    v = torch.randn(3, nk, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grid = np.zeros((3, n, n))
    uv = zigzag_order(n)[:nk]
    grid[:, uv[:, 0], uv[:, 1]] = v.numpy()
    np.testing.assert_allclose(codec.decode(v).numpy(), scipy.fft.idctn(grid, axes=(1, 2), norm="ortho"), atol=1e-12)


def _iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def _shapes():
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    rect = torch.zeros(128, 128, dtype=torch.bool)
    rect[34:94, 24:104] = True  # 80 x 60
    ellipse = ((yy + 0.5 - 64) / 40) ** 2 + ((xx + 0.5 - 64) / 55) ** 2 <= 1
    return {"rectangle": rect, "ellipse": ellipse}


@pytest.mark.parametrize("threshold", ["midrange", "0.5"])
@pytest.mark.parametrize("shape", ["rectangle", "ellipse"])
def test_round_trip_iou_of_simple_shapes(shape, threshold):
    m = _shapes()[shape]
    codec = DCTCodec(128, 256, threshold=threshold)
    rec = codec.binarize(codec.decode(codec.encode(m[None].float())))[0]
    assert rec.dtype == torch.bool
    assert _iou(rec, m) > 0.98


def test_midrange_threshold_is_strict_and_scale_and_dc_invariant():
    codec = DCTCodec(32, 40)
    v = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = codec.binarize(codec.decode(v))
    assert torch.equal(codec.binarize(codec.decode(3.7 * v)), ref)
    shifted = v.clone()
    shifted[:, 0] += 5.0
    assert torch.equal(codec.binarize(codec.decode(shifted)), ref)
    # strict ">": a two-valued map at exactly the mid-range gives only the upper value
    two = torch.zeros(1, 32, 32, dtype=torch.float64)
    two[0, :, :16] = 1
    assert codec.binarize(two).sum() == 32 * 16
    # constant maps (deviation from the reference, which returns an empty mask): the 0.5 rule
    assert not codec.binarize(torch.zeros(1, 32, 32)).any()
    full = torch.ones(2, 32, 32, dtype=torch.float64)
    full[1, :4] = 0  # not constant: mid-range as usual
    assert codec.binarize(full)[0].all() and codec.binarize(full)[1].sum() == 28 * 32
    box_filling = torch.ones(1, 32, 32)  # a mask filling its box codes to the DC term alone
    assert codec.binarize(codec.decode(codec.encode(box_filling))).all()


def test_half_threshold_option():
    codec = DCTCodec(8, 10, threshold="0.5")
    x = torch.full((1, 8, 8), 0.5)
    assert codec.binarize(x).all() and not codec.binarize(x - 1e-3).any()
    with pytest.raises(ValueError, match="threshold"):
        DCTCodec(8, 10, threshold="0.3")


def test_batched_equals_one_by_one_and_float32_close_to_float64():
    codec = DCTCodec(128, 256)
    masks = _random_masks(4, 128, seed=4)
    batched = codec.encode(masks)
    single = torch.cat([codec.encode(masks[i:i + 1]) for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-12)  # one mask takes the one-mask path: same values
    decoded = codec.decode(batched)
    assert torch.allclose(decoded, torch.cat([codec.decode(batched[i:i + 1]) for i in range(4)]), atol=1e-12)
    strided = torch.stack([batched[2], -batched[2]], 1).view(1, -1)[:, ::2]  # a non-contiguous single vector
    assert not strided.is_contiguous() and torch.equal(codec.decode(strided), codec.decode(batched[2:3]))
    view = masks[1:2].transpose(1, 2)  # a non-contiguous single mask
    assert torch.allclose(codec.encode(view), codec.encode(view.contiguous()), atol=1e-12)
    v32 = codec.encode(masks.float())
    assert v32.dtype == torch.float32
    assert torch.allclose(v32.double(), batched, atol=1e-3)
    d32 = codec.decode(v32)
    assert d32.dtype == torch.float32 and torch.allclose(d32.double(), codec.decode(batched), atol=1e-4)


def test_one_vector_decodes_in_strict_deterministic_mode():
    """put_ (the one-mask path) is listed as nondeterministic; under torch.use_deterministic_algorithms(True) one
    vector takes the batched path instead of raising, with the same values."""
    codec = DCTCodec(32, 40)
    v = torch.randn(1, 40, generator=torch.Generator().manual_seed(5))
    fast = codec.decode(v)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = codec.decode(v)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    torch.testing.assert_close(strict, fast, rtol=0, atol=1e-6)


def test_empty_batch_bool_input_and_gradients():
    codec = DCTCodec(16, 30)
    assert codec.encode(torch.zeros(0, 16, 16)).shape == (0, 30)
    assert codec.decode(torch.zeros(0, 30, dtype=torch.float64)).shape == (0, 16, 16)
    assert codec.binarize(torch.zeros(0, 16, 16)).shape == (0, 16, 16)
    b = torch.zeros(2, 16, 16, dtype=torch.bool)
    b[:, 3:9, 4:12] = True
    assert torch.allclose(codec.encode(b), codec.encode(b.float()))
    small = DCTCodec(6, 10)
    for k in (1, 2):  # one vector takes the one-mask path
        v = torch.randn(k, 10, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(small.decode, (v,))
    m = torch.rand(1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(small.encode, (m,))


def test_bad_shapes_and_sizes_raise():
    codec = DCTCodec(16, 30)
    with pytest.raises(ValueError, match=r"\[K,16,16\]"):
        codec.encode(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"\[K,30\]"):
        codec.decode(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="exceeds"):
        DCTCodec(8, 65)


def test_large_decode_into_huge_pages_equals_small_batches_and_keeps_gradients():
    codec = DCTCodec(128, 256)
    v = torch.randn(600, 256, generator=torch.Generator().manual_seed(4))  # 600 x 64 KiB: above 32 MiB
    whole = codec.decode(v)
    halves = torch.cat([codec.decode(v[:300]), codec.decode(v[300:])])  # below: plain allocations
    assert whole.shape == (600, 128, 128) and whole.is_contiguous()
    torch.testing.assert_close(whole, halves, rtol=0, atol=1e-6)
    g = v.clone().requires_grad_(True)
    codec.decode(g).sum().backward()  # the differentiable path is kept under autograd
    assert g.grad is not None and g.grad.shape == v.shape


def test_one_mask_ab_benchmark_runs_all_three_paths(monkeypatch, capsys):
    """benchmarks/ab_dct_one_mask.py checks the three paths agree before timing them, and prints all three."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ab_dct_one_mask

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["ab_dct_one_mask.py", "--windows", "1", "--seconds", "0.01"])
    try:
        ab_dct_one_mask.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert all(f"{op}, {path}" in out for op in ("decode", "encode")
               for path in ("batched path", "2-D mm path", "codec today"))
