"""From network outputs to per-image detections at the original image size (as in the authors' release).

1. scores = sigmoid(logits); the top-k (100) of the flattened query x class scores per image, with no
   threshold and no NMS, so one query may appear with several labels; label = index % C is the category id.
2. boxes: cxcywh -> xyxy times (w, h, w, h) of the original size. As the release they are not clamped to
   the image (COCO evaluation clips them itself).
3. masks (UQR): the selected vectors are decoded in one batched ``codec.decode`` call, binarised with the
   codec's rule (DCT: mid-range) and pasted into the *predicted* box at the original size with
   ``paste_in_image`` (bilinear, >= mask_threshold): one call per image, no per-mask loop. Codecs with
   ``loss_type == "mse_dice"`` (pca, flatten) paste their soft decoded map instead, as the release's PCA
   variant does.
   masks (SQR, ``pred_masks`` logits): bilinear upsampling to the padded input size, crop to the image's
   valid region, sigmoid > mask_threshold, nearest resize to the original size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from solq.coding import paste_in_image

__all__ = ["PostProcess", "build_postprocessor"]


class PostProcess(nn.Module):
    """Turn ``outputs`` into COCO-ready detections.

    Args:
        codec: a ``solq.coding`` codec, needed for masks from ``pred_vectors``.
        topk: detections kept per image (release: 100).
        mask_threshold: threshold after the bilinear paste / upsampling (release: 0.5).
    """

    def __init__(self, codec=None, topk: int = 100, mask_threshold: float = 0.5):
        super().__init__()
        if topk < 1:
            raise ValueError(f"PostProcess: topk must be >= 1, got {topk}")
        self.codec = codec
        self.topk = topk
        self.mask_threshold = mask_threshold

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: torch.Tensor, *, with_masks: bool = True,
                input_sizes: torch.Tensor | None = None) -> list[dict]:
        """
        Args:
            outputs: ``pred_logits`` [B,Q,C], ``pred_boxes`` [B,Q,4] (sigmoid cxcywh) and, for masks,
                ``pred_vectors`` [B,Q,n_k] or ``pred_masks`` [B,Q,h,w] (logits).
            orig_sizes: int64 [B,2] (h, w) of the original images.
            with_masks: False skips masks (faster; box evaluation only).
            input_sizes: int64 [B,2] (h, w) of the transformed, unpadded images (target ``size``); only
                used for ``pred_masks``, whose grid covers the padded batch (max of input_sizes). When
                None the mask grid is taken to cover each whole image (exact only without padding).
        Returns:
            B dicts ``{scores [K], labels int64 [K], boxes [K,4] xyxy absolute, query_index int64 [K],
            masks bool [K,h_i,w_i] (with_masks and mask outputs present)}``, K = min(topk, Q*C), sorted by
            descending score, on the outputs' device.
        """
        logits = outputs["pred_logits"]
        B, Q, C = logits.shape
        if not torch.is_tensor(orig_sizes):  # also accept a list of [2] tensors (target["orig_size"])
            orig_sizes = torch.stack([torch.as_tensor(s) for s in orig_sizes])
        orig_sizes = orig_sizes.to(logits.device).reshape(-1, 2)
        if len(orig_sizes) != B:
            raise ValueError(f"PostProcess: orig_sizes has {len(orig_sizes)} rows for a batch of {B}")
        prob = logits.float().sigmoid().flatten(1)  # [B, Q*C]
        scores, flat = prob.topk(min(self.topk, Q * C), dim=1)  # [B, K]
        query = torch.div(flat, C, rounding_mode="floor")
        labels = flat % C
        boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy")
        boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))
        h, w = orig_sizes.unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], dim=1)[:, None, :].to(boxes.dtype)

        results = [{"scores": s, "labels": l, "boxes": b, "query_index": q}
                   for s, l, b, q in zip(scores, labels, boxes, query)]
        if not with_masks:
            return results
        if "pred_vectors" in outputs and self.codec is not None:
            masks = self._vector_masks(outputs["pred_vectors"], query, boxes, orig_sizes)
        elif "pred_masks" in outputs:
            masks = self._sqr_masks(outputs["pred_masks"], query, orig_sizes, input_sizes)
        else:
            return results
        for r, m in zip(results, masks):
            r["masks"] = m
        return results

    def _vector_masks(self, vectors, query, boxes, orig_sizes) -> list[torch.Tensor]:
        """Decode the selected vectors [B,K,n_k] once, then paste per image: list of bool [K,h,w]."""
        B, K = query.shape
        sel = vectors.float().gather(1, query[..., None].expand(-1, -1, vectors.shape[-1]))
        decoded = self.codec.decode(sel.flatten(0, 1))  # [B*K, N, N]
        if getattr(self.codec, "loss_type", "l1") == "mse_dice":
            crops = decoded.float()  # soft probabilities, thresholded after pasting (release PCA)
        else:
            crops = self.codec.binarize(decoded)  # bool: the paste converts per chunk, no full float copy
        crops = crops.view(B, K, *crops.shape[-2:])
        return [paste_in_image(crops[i], boxes[i], (int(hw[0]), int(hw[1])), threshold=self.mask_threshold)
                for i, hw in enumerate(orig_sizes.tolist())]

    def _sqr_masks(self, mask_logits, query, orig_sizes, input_sizes) -> list[torch.Tensor]:
        """SQR masks: list of bool [K,h,w] (the authors' release / DETR's segmentation postprocess)."""
        B, K = query.shape
        sel = mask_logits.gather(1, query[..., None, None].expand(-1, -1, *mask_logits.shape[-2:]))
        if input_sizes is None:
            valid = None
        else:
            input_sizes = torch.as_tensor(input_sizes).reshape(-1, 2).tolist()
            if len(input_sizes) != B:
                raise ValueError(f"PostProcess: input_sizes has {len(input_sizes)} rows for a batch of {B}")
            valid = input_sizes
            padded = (max(s[0] for s in input_sizes), max(s[1] for s in input_sizes))
        out = []
        for i, (oh, ow) in enumerate(orig_sizes.tolist()):
            m = sel[i].float()[:, None]  # [K,1,h,w]
            if valid is not None:
                m = F.interpolate(m, size=padded, mode="bilinear", align_corners=False)
                m = m[..., : valid[i][0], : valid[i][1]]
            else:
                m = F.interpolate(m, size=(oh, ow), mode="bilinear", align_corners=False)
            binary = (m.sigmoid() > self.mask_threshold).float()
            out.append(F.interpolate(binary, size=(oh, ow), mode="nearest")[:, 0].bool())
        return out


def build_postprocessor(cfg, codec=None) -> PostProcess:
    """PostProcess from ``cfg.eval`` (topk, mask_threshold); the codec only matters in mode uqr."""
    return PostProcess(codec=codec if cfg.model.mode == "uqr" else None, topk=cfg.eval.topk,
                       mask_threshold=cfg.eval.mask_threshold)
