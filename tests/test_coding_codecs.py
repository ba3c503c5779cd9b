"""Codec contracts (shapes, dtypes, empty batch, gradients), PCA/sparse fitting, save/load, the registry."""
import numpy as np
import pytest
import torch

from solq.coding import (DCTCodec, FlattenCodec, PCACodec, SparseCodec, build_codec, build_codec_from_config)
from solq.coding.sparse import lasso_fista
from solq.config import CodecConfig

N = 12


def _shape_masks(k, n=N, seed=0):
    """Random rectangles and ellipses in an n x n box: float64 {0,1} [k,n,n]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    out = np.zeros((k, n, n))
    for i in range(k):
        cy, cx = rng.uniform(0.3 * n, 0.7 * n, 2)
        ry, rx = rng.uniform(0.2 * n, 0.5 * n, 2)
        if i % 2:
            out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            out[i] = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def train_masks():
    return _shape_masks(80)


def _codecs(train):
    return [DCTCodec(N, 30), PCACodec(N, 16).fit(train), PCACodec(N, 16, whiten=False, jitter=True).fit(train),
            SparseCodec(N, 16, alpha=0.05, num_iters=60, fit_epochs=2).fit(train), FlattenCodec(N)]


def test_contracts_for_every_codec(train_masks):
    masks = _shape_masks(5, seed=1)
    for codec in _codecs(train_masks):
        assert codec.is_fitted and codec.loss_type in ("l1", "mse_dice")
        for dtype in (torch.float32, torch.float64):
            v = codec.encode(masks.to(dtype))
            assert v.shape == (5, codec.dim) and v.dtype == dtype, codec
            d = codec.decode(v)
            assert d.shape == (5, codec.resolution, codec.resolution) and d.dtype == dtype, codec
            b = codec.binarize(d)
            assert b.dtype == torch.bool and b.shape == d.shape
            if codec.loss_type == "mse_dice":
                assert d.min() >= 0 and d.max() <= 1, codec
        empty = codec.encode(torch.zeros(0, codec.resolution, codec.resolution))
        assert empty.shape == (0, codec.dim)
        assert codec.decode(empty).shape == (0, codec.resolution, codec.resolution)
        assert codec.binarize(codec.decode(empty)).shape == (0, codec.resolution, codec.resolution)
        v = torch.randn(3, codec.dim, dtype=torch.float64, requires_grad=True)
        codec.decode(v).square().sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0, codec
        # batched equals one by one (pca with jitter is stochastic: skip it)
        if not getattr(codec, "jitter", False):
            one = torch.cat([codec.encode(masks[i:i + 1]) for i in range(5)])
            assert torch.allclose(one, codec.encode(masks), atol=1e-8), codec


def test_pca_equals_numpy_projection(train_masks):
    codec = PCACodec(N, 10, whiten=False).fit(train_masks)
    x = train_masks.reshape(80, -1).numpy()
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    test = _shape_masks(6, seed=2)
    t = test.reshape(6, -1).numpy()
    proj = (t - mean) @ vt[:10].T @ vt[:10] + mean
    np.testing.assert_allclose(codec.decode(codec.encode(test)).reshape(6, -1).numpy(), np.clip(proj, 0, 1),
                               atol=1e-8)
    # codes are the projections up to the sign of each component
    np.testing.assert_allclose(np.abs(codec.encode(test).numpy()), np.abs((t - mean) @ vt[:10].T), atol=1e-8)


def test_pca_whitening_gives_unit_variance_codes(train_masks):
    codec = PCACodec(N, 8, whiten=True).fit(train_masks)
    var = codec.encode(train_masks).var(0)
    assert torch.allclose(var, torch.ones(8, dtype=torch.float64), atol=1e-6)
    ratio = codec.explained_variance_ratio()
    assert (ratio[:-1] >= ratio[1:]).all() and 0 < ratio.sum() <= 1


def test_pca_jitter_targets_are_stochastic_and_decode_is_sigmoid(train_masks):
    codec = PCACodec(N, 16, jitter=True).fit(train_masks)
    a, b = codec.encode(train_masks[:3]), codec.encode(train_masks[:3])
    assert not torch.equal(a, b)
    d = codec.decode(a)
    assert (d > 0).all() and (d < 1).all()
    iou = (codec.binarize(d) & train_masks[:3].bool()).sum() / (codec.binarize(d) | train_masks[:3].bool()).sum()
    assert iou > 0.9


def test_pca_with_fewer_masks_than_components_warns_and_works():
    masks = _shape_masks(5)
    with pytest.warns(UserWarning, match="only"):
        codec = PCACodec(N, 16).fit(masks)
    v = codec.encode(masks)
    assert torch.isfinite(v).all() and (v[:, 5:] == 0).all()
    assert torch.allclose(codec.decode(v), masks, atol=1e-6)  # 5 masks span a 4-d affine subspace


def test_lasso_fista_matches_scikit_learn():
    from sklearn.decomposition import sparse_encode

    rng = np.random.default_rng(0)
    d = rng.standard_normal((10, 40))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    x = rng.standard_normal((7, 40))
    alpha = 0.3
    ref = sparse_encode(x, d, algorithm="lasso_cd", alpha=alpha, max_iter=10000)
    dt = torch.from_numpy(d)
    gram = dt @ dt.T
    lip = float(torch.linalg.eigvalsh(gram)[-1])
    got = lasso_fista(torch.from_numpy(x) @ dt.T, gram, alpha, lip, 3000).numpy()

    def objective(v):
        return 0.5 * ((x - v @ d) ** 2).sum(1) + alpha * np.abs(v).sum(1)

    assert np.all(objective(got) <= objective(ref) + 1e-8)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert (got == 0).any()  # the L1 penalty zeroes some codes


def test_sparse_fit_unit_atoms_and_reconstruction(train_masks):
    codec = SparseCodec(N, 24, alpha=0.05, num_iters=100, fit_epochs=3).fit(train_masks)
    atoms = codec._tensors(torch.device("cpu"), torch.float64)["dictionary"]
    assert torch.allclose(atoms.norm(dim=1), torch.ones(24, dtype=torch.float64), atol=1e-9)
    rec = codec.binarize(codec.decode(codec.encode(train_masks)))
    iou = (rec & train_masks.bool()).sum() / (rec | train_masks.bool()).sum()
    assert iou > 0.9
    # decoding is the linear map v @ D
    v = torch.randn(2, 24, dtype=torch.float64)
    assert torch.allclose(codec.decode(v).reshape(2, -1), v @ atoms)


@pytest.mark.parametrize("name", ["pca", "sparse"])
def test_save_load_round_trip(tmp_path, train_masks, name):
    params = dict(resolution=N, num_coeffs=8)
    fast = {"num_iters": 50, "fit_epochs": 2} if name == "sparse" else {}
    codec = build_codec(name, **params, **fast)
    assert not codec.is_fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        codec.encode(train_masks[:2])
    codec.fit(train_masks)
    path = tmp_path / f"{name}.pt"
    codec.save(path)
    loaded = build_codec(name, file=str(path), **params, **fast)
    assert loaded.is_fitted and loaded.num_fit_samples == 80
    x = _shape_masks(4, seed=3)
    assert torch.allclose(loaded.encode(x), codec.encode(x), atol=1e-4)
    assert torch.allclose(loaded.decode(codec.encode(x)), codec.decode(codec.encode(x)), atol=1e-5)
    with pytest.raises(ValueError, match="resolution"):
        build_codec(name, resolution=N + 1, num_coeffs=8).load(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_codec(name, **params).load(tmp_path / "missing.pt")


def test_pca_load_rejects_other_jitter(tmp_path, train_masks):
    PCACodec(N, 8, jitter=True).fit(train_masks).save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="jitter"):
        PCACodec(N, 8, jitter=False).load(tmp_path / "p.pt")
    assert PCACodec(N, 8, jitter=True, whiten=False).load(tmp_path / "p.pt").is_fitted  # whitening is free


def test_flatten_encode_resizes_and_decode_clamps():
    codec = FlattenCodec()
    assert codec.resolution == 28 and codec.dim == 784 and codec.loss_type == "mse_dice"
    x = (torch.rand(3, 28, 28) > 0.5).float()
    assert torch.equal(codec.encode(x), x.reshape(3, 784))
    big = torch.rand(2, 56, 56, dtype=torch.float64)
    pooled = big.reshape(2, 28, 2, 28, 2).mean((2, 4))
    assert torch.allclose(codec.encode(big), pooled.reshape(2, 784))
    d = codec.decode(torch.linspace(-1, 2, 784)[None])
    assert d.min() == 0 and d.max() == 1


def test_build_codec_registry_and_config(tmp_path, train_masks):
    assert isinstance(build_codec("dct", resolution=64, num_coeffs=128), DCTCodec)
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec("wavelet")
    with pytest.raises(ValueError, match="bad parameters"):
        build_codec("dct", resolutoin=64)
    cfg = CodecConfig(name="dct", resolution=64, num_coeffs=100, threshold="0.5")
    c = build_codec_from_config(cfg)
    assert (c.resolution, c.dim, c.threshold) == (64, 100, "0.5")
    assert build_codec_from_config(CodecConfig(name="flatten")).dim == 784
    PCACodec(N, 8, whiten=True).fit(train_masks).save(tmp_path / "pca.pt")
    pca = build_codec_from_config(CodecConfig(name="pca", resolution=N, num_coeffs=8, file=str(tmp_path / "pca.pt")))
    assert pca.is_fitted and pca.whiten
    sparse = build_codec_from_config(CodecConfig(name="sparse", resolution=N, num_coeffs=8, sparse_alpha=0.2))
    assert not sparse.is_fitted and sparse.alpha == 0.2


def test_each_codec_registers_itself_and_reads_its_own_config():
    from solq.coding import CODECS, DCTCodec, register_codec
    from solq.config import load_config

    assert set(CODECS) == {"dct", "pca", "sparse", "flatten"}
    for name in CODECS:
        codec = build_codec_from_config(load_config("smoke", [f"codec.name={name}", "codec.num_coeffs=40"]).codec)
        assert type(codec) is CODECS[name] and codec.dim == (784 if name == "flatten" else 40)

    class Impostor(DCTCodec):
        name = "dct"

    with pytest.raises(ValueError, match="taken by DCTCodec"):
        register_codec(Impostor)
    assert CODECS["dct"] is DCTCodec
