"""PostProcess: top-k over query x class, box scaling, masks pasted in the predicted box, SQR masks."""
import time

import pytest
import torch
import torch.nn.functional as F

from solq.coding import DCTCodec
from solq.models.postprocess import PostProcess


class _OnesCodec:
    """Decodes anything to a full crop (isolates the paste geometry from any codec)."""
    name, loss_type, resolution, dim = "ones", "l1", 16, 3

    def decode(self, v):
        return torch.ones(len(v), 16, 16)

    def binarize(self, d):
        return d >= 0.5


def _outputs(B, Q, C, gen, dim=None):
    out = {"pred_logits": torch.randn(B, Q, C, generator=gen),
           "pred_boxes": torch.cat([torch.rand(B, Q, 2, generator=gen) * 0.5 + 0.25,
                                    torch.rand(B, Q, 2, generator=gen) * 0.3 + 0.1], -1)}
    if dim:
        out["pred_vectors"] = torch.randn(B, Q, dim, generator=gen)
    return out


def test_topk_over_query_and_class():
    gen = torch.Generator().manual_seed(0)
    B, Q, C = 2, 7, 5
    out = _outputs(B, Q, C, gen)
    out["pred_logits"][0, 3, 1] = 9.0  # query 3 strongly in two classes: listed twice
    out["pred_logits"][0, 3, 4] = 8.0
    res = PostProcess(topk=10)(out, torch.tensor([[100, 200], [50, 60]]), with_masks=False)
    assert len(res) == B
    for b, r in enumerate(res):
        assert set(r) == {"scores", "labels", "boxes", "query_index"}
        naive = sorted(((float(torch.sigmoid(out["pred_logits"][b, q, c])), q, c)
                        for q in range(Q) for c in range(C)), reverse=True)[:10]
        assert r["scores"].tolist() == pytest.approx([s for s, _, _ in naive])
        assert r["query_index"].tolist() == [q for _, q, _ in naive]
        assert r["labels"].tolist() == [c for _, _, c in naive]
    assert res[0]["query_index"][:2].tolist() == [3, 3] and res[0]["labels"][:2].tolist() == [1, 4]
    assert len(PostProcess(topk=100)(out, torch.tensor([[9, 9], [9, 9]]), with_masks=False)[0]["scores"]) == Q * C


def test_boxes_scaled_to_original_size_not_clamped():
    gen = torch.Generator().manual_seed(1)
    out = _outputs(2, 4, 3, gen)
    out["pred_boxes"][1, 0] = torch.tensor([0.95, 0.5, 0.3, 0.2])  # sticks out on the right
    sizes = torch.tensor([[100, 200], [50, 60]])
    res = PostProcess(topk=12)(out, sizes, with_masks=False)
    for b, r in enumerate(res):
        h, w = sizes[b].tolist()
        for box, q in zip(r["boxes"], r["query_index"].tolist()):
            cx, cy, bw, bh = out["pred_boxes"][b, q].tolist()
            ref = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            assert box.tolist() == pytest.approx(ref, abs=1e-4)
    assert res[1]["boxes"][:, 2].max() > 60  # release behaviour: no clamping


def test_masks_pasted_in_predicted_box():
    gen = torch.Generator().manual_seed(2)
    out = _outputs(2, 6, 3, gen, dim=3)
    sizes = torch.tensor([[80, 120], [64, 64]])
    res = PostProcess(codec=_OnesCodec(), topk=5)(out, sizes)
    for b, r in enumerate(res):
        assert r["masks"].dtype == torch.bool and r["masks"].shape == (5, *sizes[b].tolist())
        for m, box in zip(r["masks"], r["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            got = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert [float(v) for v in got] == pytest.approx(box.tolist(), abs=1.01)
    assert "masks" not in PostProcess(codec=_OnesCodec())(out, sizes, with_masks=False)[0]


def test_initial_dct_vector_gives_box_mask_and_speed():
    codec = DCTCodec(resolution=128, num_coeffs=256)
    gen = torch.Generator().manual_seed(3)
    Q = 100
    out = _outputs(1, Q, 2, gen)
    out["pred_vectors"] = torch.full((1, Q, 256), -2.0)
    out["pred_vectors"][..., :2] = 0.0  # the vector head's output at init (reference §2.6)
    post = PostProcess(codec=codec, topk=100)
    sizes = torch.tensor([[512, 512]])
    r = post(out, sizes)[0]
    for m, box in zip(r["masks"][:10], r["boxes"][:10]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(got, box, atol=2.0)
        x0, y0, x1, y1 = box.round().int().tolist()
        assert m[y0:y1, x0:x1].float().mean() > 0.97  # (near-)full box
    post(out, sizes)  # warm-up
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        post(out, sizes)
    ms = (time.perf_counter() - t0) / reps * 1000
    print(f"\nPostProcess: 100 DCT masks (128x128, 256 coeffs) on 512x512: {ms:.1f} ms "
          f"({torch.get_num_threads()} threads)")


def test_sqr_masks_cropped_to_valid_region_and_resized():
    # two images of transformed sizes 64x48 and 48x64, padded to 64x64; stride-16 logits (4x4)
    B, Q, C = 2, 3, 2
    gen = torch.Generator().manual_seed(4)
    out = _outputs(B, Q, C, gen)
    logits = torch.full((B, Q, 4, 4), -10.0)
    logits[0, :, :, :3] = 10.0  # image 0 valid width 48 = 3 cells
    logits[1, :, :3, :] = 10.0  # image 1 valid height 48 = 3 cells
    out["pred_masks"] = logits
    orig = torch.tensor([[128, 96], [96, 128]])
    inputs = torch.tensor([[64, 48], [48, 64]])
    res = PostProcess(topk=4)(out, orig, input_sizes=inputs)
    for b in range(B):
        m = res[b]["masks"]
        assert m.shape == (4, *orig[b].tolist()) and m.dtype == torch.bool
        assert m.float().mean() > 0.95  # the valid region is all foreground, padding cropped away
    # without input_sizes the grid is assumed to cover the whole image: the padded quarter shows
    res = PostProcess(topk=4)(out, orig)
    assert 0.6 < res[0]["masks"].float().mean() < 0.9


def test_dct_masks_equal_per_mask_grid_sample_paste_of_the_binarised_decode():
    # the whole UQR path: top-k pairs -> decode the chosen queries' vectors -> mid-range binarise ->
    # bilinear paste (grid_sample, per mask) into the predicted box at the original size -> >= 0.5
    gen = torch.Generator().manual_seed(5)
    codec = DCTCodec(resolution=32, num_coeffs=40)
    out = _outputs(2, 9, 3, gen, dim=40)
    out["pred_boxes"][0, 0] = torch.tensor([0.1, 0.9, 0.5, 0.4])  # partly outside the image
    sizes = torch.tensor([[60, 90], [47, 33]])
    res = PostProcess(codec=codec, topk=12)(out, sizes)
    for b, r in enumerate(res):
        h, w = sizes[b].tolist()
        crops = codec.binarize(codec.decode(out["pred_vectors"][b, r["query_index"]])).float()
        for m, crop, box in zip(r["masks"], crops, r["boxes"].double()):
            x0, y0, x1, y1 = box.tolist()
            gx = ((torch.arange(w, dtype=torch.float64) + 0.5) - x0) / (x1 - x0) * 2 - 1
            gy = ((torch.arange(h, dtype=torch.float64) + 0.5) - y0) / (y1 - y0) * 2 - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
            val = F.grid_sample(crop.double()[None, None], grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
            assert torch.equal(m, val[0, 0] >= 0.5)
    assert sum(int(r["masks"].any(dim=(1, 2)).sum()) for r in res) >= 20  # non-trivial masks
