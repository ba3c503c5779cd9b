"""Set criterion: focal classification, L1 + GIoU boxes, mask-vector and mask losses (as in the authors' release).

For every decoder layer (the last one plus ``aux_outputs``, each matched independently) and, with
two-stage, the encoder proposals, the criterion computes raw loss terms; ``criterion.weight_dict`` says
how to weight them (the engine sums ``loss[k] * weight_dict[k]``). Key names: ``loss_ce``,
``loss_bbox``, ``loss_giou``, ``loss_vector`` (uqr), ``loss_mask`` + ``loss_dice`` (sqr); suffix ``_i``
for decoder layer i < L-1 and ``_enc`` for the encoder. ``class_error`` (last layer) is logged only.

Hybrid matching (H-DETR): when the outputs carry ``one2many_outputs`` (the model's extra query group), every
ground-truth object is repeated ``one2many_k`` times and Hungarian-matched to that group, layer by layer, with
the same losses (the vector loss included; the SQR mask loss stays on the main group), normalised by the
repeated count and weighted by ``one2many_weight``; keys get the suffix ``_one2many``. ``enc_one2many_k`` > 1
matches each object to that many two-stage encoder proposals in the same way (a one-to-many assignment for the
proposals, in the spirit of DETA).

Normalisation (release solq.py): focal, L1 and GIoU are sums divided by ``num_boxes`` (GT boxes in the
batch, averaged over processes, at least 1). The DCT vector loss is ``coef * mean |v_hat - v|`` over
matched pairs x coefficients (``vector_loss_norm="mean"``; with several processes the matched count
is averaged over them, as num_boxes is, so 2 processes x 1 image equal 1 process x 2 images) or
``coef * sum |v_hat - v| / num_boxes`` ("num_boxes", the fast_solq variant). Codecs with ``loss_type == "mse_dice"`` (pca, flatten) use
``coef * (sum (v_hat - v)^2 / num_boxes / dim + dice(decode(v_hat), crop))`` (the release's PCA variant). The
coefficient is applied inside the term, so ``weight_dict["loss_vector"]`` is 1.

Pixel-space vector loss (``vector_dice_coef`` > 0, l1 codecs; not in the release): ``loss_vector_dice``, the
squared-denominator dice between ``decode(v_hat)`` and the ground-truth crop, summed over matched pairs /
num_boxes, beside the L1 on coefficients. The L1 weighs every coefficient alike; the dice weighs the pixels
where the decoded mask is wrong, which is what mask AP counts. Its minimum is at ``decode(v_hat) = crop``
also for decoded values outside [0, 1] (the DCT decode is linear and unbounded).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from solq.coding import crop_to_box

from .matcher import HungarianMatcher, build_matcher

__all__ = ["SetCriterion", "build_criterion", "LOSS_KEYS", "dice_loss"]

# loss name (as in ``losses=``) -> the keys it produces
LOSS_KEYS = {
    "labels": ("loss_ce",),
    "boxes": ("loss_bbox", "loss_giou"),
    "vectors": ("loss_vector",),
    "masks": ("loss_mask", "loss_dice"),
}
_DEFAULT_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_vector": 1.0,
                    "loss_mask": 1.0, "loss_dice": 1.0}


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, *, squared: bool = False,
              eps: float = 1.0) -> torch.Tensor:
    """Sum over masks of ``1 - (2 sum(p t) + e) / (sum p + sum t + e)``.

    Args:
        probs, targets: [K, P] (flattened masks; probabilities and {0,1} targets).
        squared: use ``sum p^2 + sum t^2`` in the denominator and ``eps`` there only (the PCA variant,
            the authors' release); otherwise the DETR form with +eps on both sides.
    Returns: scalar (not normalised).
    """
    inter = 2 * (probs * targets).sum(1)
    if squared:
        return (1 - inter / (probs.pow(2).sum(1) + targets.pow(2).sum(1) + eps)).sum()
    return (1 - (inter + eps) / (probs.sum(1) + targets.sum(1) + eps)).sum()


class _GroundTruth:
    """The batch's GT concatenated over images, with crops/vectors computed once per criterion call.

    Decoder layers match different queries to the same targets, so the codec targets of all GT objects
    are encoded once (batched) and then indexed by each layer's matches.
    """

    def __init__(self, targets: list[dict], device: torch.device, source: "tuple[_GroundTruth, torch.Tensor] | None" = None):
        self.targets = targets
        self.device = device
        sizes = [len(t["labels"]) for t in targets]
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.total = sum(sizes)
        self._crops: dict[int, torch.Tensor] = {}
        self._vectors = None
        self._source = source  # (ground truth, int64 [total] rows of it) when these targets repeat another's

    def repeated(self, k: int) -> "_GroundTruth":
        """The same objects, each image's repeated ``k`` times (in order o_1..o_n, o_1..o_n, ...); crops and
        vectors are read from this one's, not recomputed. Targets keep ``labels``, ``boxes`` and ``image_id``."""
        reps, rows = [], []
        for t, o in zip(self.targets, self.offsets):
            n = len(t["labels"])
            reps.append({"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1),
                         **({"image_id": t["image_id"]} if "image_id" in t else {})})
            rows.append(torch.arange(n).repeat(k) + o)
        index = torch.cat(rows).to(self.device) if rows else torch.empty(0, dtype=torch.int64, device=self.device)
        return _GroundTruth(reps, self.device, source=(self, index))

    def global_index(self, indices) -> torch.Tensor:
        """int64 [k] positions of the matched targets in the concatenation (layer's matching order)."""
        if not indices:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat([j + o for (_, j), o in zip(indices, self.offsets)]).to(self.device)

    def concat(self, key: str) -> torch.Tensor:
        return torch.cat([t[key] for t in self.targets]).to(self.device)

    @torch.no_grad()
    def crops(self, size: int) -> torch.Tensor:
        """float {0,1} [total, size, size]: every GT mask cropped to its GT ``boxes_xyxy``."""
        if self._source is not None:
            return self._source[0].crops(size)[self._source[1]]
        if size not in self._crops:
            parts = []
            for t in self.targets:  # one batched crop per image (masks differ in size between images)
                n = len(t["labels"])
                if n == 0:
                    continue
                for key in ("masks", "boxes_xyxy"):
                    if key not in t:
                        raise KeyError(f"SetCriterion: target of image_id {_image_id(t)} has no '{key}' "
                                       f"(needed for the mask-vector loss)")
                if len(t["masks"]) != n or len(t["boxes_xyxy"]) != n:
                    raise ValueError(f"SetCriterion: target of image_id {_image_id(t)} has {n} labels but "
                                     f"{len(t['masks'])} masks and {len(t['boxes_xyxy'])} boxes_xyxy")
                parts.append(crop_to_box(t["masks"].to(self.device), t["boxes_xyxy"].to(self.device), size))
            self._crops[size] = (torch.cat(parts).float() if parts else
                                 torch.zeros(0, size, size, device=self.device))
        return self._crops[size]

    @torch.no_grad()
    def vectors(self, codec) -> torch.Tensor:
        """float [total, codec.dim]: ``codec.encode`` of :meth:`crops`, one call for the whole batch."""
        if self._source is not None:
            return self._source[0].vectors(codec)[self._source[1]]
        if self._vectors is None:
            self._vectors = codec.encode(self.crops(codec.resolution)).float()
        return self._vectors


def _image_id(t: dict):
    i = t.get("image_id")
    return int(i) if i is not None else "?"


def _src_index(indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch_idx, query_idx), int64 [k] each on ``device``, for the matched predictions of all images."""
    batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    query = torch.cat([q for q, _ in indices])
    return batch.to(device), query.to(device)


class SetCriterion(nn.Module):
    """DETR-style set loss for SOLQ (uqr), the SQR baseline (sqr) and plain detection (det).

    Args:
        num_classes: C, the number of logits (max category id + 1).
        matcher: a :class:`HungarianMatcher` (or anything with the same call signature).
        codec: a ``solq.coding`` codec; required for the "vectors" loss.
        losses: subset of ("labels", "boxes", "vectors", "masks").
        weight_dict: weights of the last-layer keys (``loss_ce`` ...); defaults ``{loss_ce: 2,
            loss_bbox: 5, loss_giou: 2, loss_vector: 1, loss_mask: 1, loss_dice: 1}``. They are copied to
            the ``_i`` / ``_enc`` keys this criterion produces; a suffixed key given explicitly wins.
        focal_alpha, focal_gamma: sigmoid focal loss parameters (0.25, 2).
        vector_loss_coef: multiplies the vector loss inside the term (release: 3).
        vector_loss_norm: "mean" (release solq.py) or "num_boxes" (fast_solq); l1 codecs only.
        vector_loss_stages: number of final decoder layers that get the vector loss; 0 = all (Table 3c).
        num_dec_layers: L, the number of decoder layers (``aux_outputs`` holds layers 0..L-2).
        one2many: the model has a hybrid-matching query group (adds the ``_one2many`` weights).
        one2many_k, one2many_weight: repeats of each object for that group, and its losses' weight.
        enc_one2many_k: proposals matched to each object in the two-stage encoder loss (1 = one-to-one).
        cls_loss: "focal" (the release) or "quality_focal" (IoU-valued targets; see :meth:`loss_labels`).
        denoising: the model has denoising queries (adds the ``_dn`` weights: the main ones, unscaled).
        vector_dice_coef: weight of ``loss_vector_dice`` (pixel-space dice of the decoded vector; l1 codecs);
            0 = off, as the release.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, codec=None,
                 losses=("labels", "boxes", "vectors"), weight_dict: dict | None = None,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, vector_loss_coef: float = 3.0,
                 vector_loss_norm: str = "mean", vector_loss_stages: int = 0, num_dec_layers: int = 6,
                 one2many: bool = False, one2many_k: int = 6, one2many_weight: float = 1.0,
                 enc_one2many_k: int = 1, cls_loss: str = "focal", denoising: bool = False,
                 vector_dice_coef: float = 0.0):
        super().__init__()
        unknown = set(losses) - set(LOSS_KEYS)
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; choose from {list(LOSS_KEYS)}")
        if "vectors" in losses and codec is None:
            raise ValueError("SetCriterion: the 'vectors' loss needs a codec")
        if codec is not None and getattr(codec, "loss_type", "l1") not in ("l1", "mse_dice"):
            raise ValueError(f"SetCriterion: codec loss_type {codec.loss_type!r} is not 'l1' or 'mse_dice'")
        if vector_loss_norm not in ("mean", "num_boxes"):
            raise ValueError(f"SetCriterion: vector_loss_norm {vector_loss_norm!r} is not 'mean' or 'num_boxes'")
        if not 0 <= vector_loss_stages <= num_dec_layers:
            raise ValueError(f"SetCriterion: vector_loss_stages={vector_loss_stages} not in 0..{num_dec_layers}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.codec = codec
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.vector_loss_coef = vector_loss_coef
        self.vector_loss_norm = vector_loss_norm
        self.vector_loss_stages = vector_loss_stages
        self.num_dec_layers = num_dec_layers
        if one2many_k < 1 or enc_one2many_k < 1:
            raise ValueError(f"SetCriterion: one2many_k and enc_one2many_k must be >= 1, got {one2many_k}, {enc_one2many_k}")
        self.one2many, self.one2many_k, self.one2many_weight = one2many, one2many_k, one2many_weight
        self.enc_one2many_k = enc_one2many_k
        if cls_loss not in ("focal", "quality_focal"):
            raise ValueError(f"SetCriterion: cls_loss {cls_loss!r} is not 'focal' or 'quality_focal'")
        self.cls_loss = cls_loss
        self.denoising = denoising
        if vector_dice_coef < 0:
            raise ValueError(f"SetCriterion: vector_dice_coef must be >= 0, got {vector_dice_coef}")
        if vector_dice_coef > 0 and getattr(codec, "loss_type", "l1") != "l1":
            raise ValueError("SetCriterion: vector_dice_coef is for l1 codecs (dct, sparse); "
                             f"{codec.name} already has a dice term")
        self.vector_dice = vector_dice_coef > 0 and "vectors" in self.losses
        self.weight_dict = self._expand_weights({**_DEFAULT_WEIGHTS, "loss_vector_dice": float(vector_dice_coef),
                                                 **(weight_dict or {})})

    # ---- which loss runs where -------------------------------------------------------------------
    def _layer_losses(self, layer: int | None) -> tuple[str, ...]:
        """Losses of decoder layer ``layer`` (0..L-1), or of the encoder when None."""
        if layer is None:
            return tuple(name for name in self.losses if name in ("labels", "boxes"))
        last = layer == self.num_dec_layers - 1
        out = []
        for name in self.losses:
            if name == "masks" and not last:  # SQR mask branch exists for the last layer only
                continue
            if name == "vectors" and self.vector_loss_stages and layer < self.num_dec_layers - self.vector_loss_stages:
                continue
            out.append(name)
        return tuple(out)

    def _keys(self, name: str) -> tuple[str, ...]:
        """The loss keys that loss ``name`` produces here."""
        return LOSS_KEYS[name] + (("loss_vector_dice",) if name == "vectors" and self.vector_dice else ())

    def _expand_weights(self, base: dict) -> dict:
        weights = {}
        layers = [(l, "" if l == self.num_dec_layers - 1 else f"_{l}") for l in range(self.num_dec_layers)]
        for layer, suffix in layers + [(None, "_enc")]:
            for name in self._layer_losses(layer):
                for key in self._keys(name):
                    weights[key + suffix] = float(base.get(key + suffix, base[key]))
                    if self.one2many and layer is not None and name != "masks":
                        weights[key + suffix + "_one2many"] = float(
                            base.get(key + suffix + "_one2many", base[key] * self.one2many_weight))
                    if self.denoising and layer is not None and name != "masks":
                        weights[key + suffix + "_dn"] = float(base.get(key + suffix + "_dn", base[key]))
        return weights

    # ---- individual losses -----------------------------------------------------------------------
    def loss_labels(self, outputs, targets, indices, num_boxes, gt, log=False):
        """Sigmoid focal loss over all queries x classes, summed, / num_boxes (as in the authors' release).

        With ``cls_loss="quality_focal"`` the matched (query, class) target is the IoU of the predicted and the
        ground-truth box instead of 1 (detached), with the quality focal loss of Li et al. (GFL, NeurIPS 2020):
        BCE(sigmoid(x), t) * |t - sigmoid(x)|^gamma, so scores learn to rank by localisation quality."""
        logits = outputs["pred_logits"].float()
        batch, query = _src_index(indices, logits.device)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)]
                            for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        if self.cls_loss == "quality_focal":
            with torch.no_grad():
                src = outputs["pred_boxes"][batch, query].float()
                tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
                iou = box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt.to(src), "cxcywh", "xyxy"))
                onehot[batch, query, labels] = iou.diagonal().clamp(min=0.01).to(onehot.dtype)
            prob = logits.sigmoid()
            loss = (F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
                    * (onehot - prob).abs().pow(self.focal_gamma)).sum() / num_boxes
        else:
            onehot[batch, query, labels] = 1.0
            loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                      reduction="sum") / num_boxes
        out = {"loss_ce": loss}
        if log:
            with torch.no_grad():
                matched = logits[batch, query]
                acc = (matched.argmax(-1) == labels).float().mean() * 100 if len(labels) else logits.new_zeros(())
                out["class_error"] = 100 - acc
        return out

    def loss_boxes(self, outputs, targets, indices, num_boxes, gt):
        """L1 on normalised cxcywh and 1 - GIoU on xyxy over matched pairs, each summed / num_boxes."""
        pred = outputs["pred_boxes"]
        src = pred[_src_index(indices, pred.device)].float()
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = tgt.to(pred.device).float()
        if len(src) == 0:
            zero = 0.0 * pred.sum()
            return {"loss_bbox": zero, "loss_giou": zero.clone()}
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"),
                                             box_convert(tgt, "cxcywh", "xyxy"), reduction="sum") / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_vectors(self, outputs, targets, indices, num_boxes, gt):
        """Mask-vector loss against ``codec.encode(crop_to_box(gt_mask, gt_box_xyxy, N))``."""
        if "pred_vectors" not in outputs:
            raise KeyError("SetCriterion: the 'vectors' loss needs outputs['pred_vectors'] (model.mode uqr)")
        pred = outputs["pred_vectors"]
        src = pred[_src_index(indices, pred.device)].float()
        # "mean" divides by the matched pairs averaged over processes (every rank must join this
        # all-reduce, so it comes before the early return); in one process it is the plain mean.
        num_matched = self._process_average(len(src), pred.device) if self.vector_loss_norm == "mean" else 1.0
        if len(src) == 0:
            zero = 0.0 * pred.sum()
            return {"loss_vector": zero, **({"loss_vector_dice": zero.clone()} if self.vector_dice else {})}
        gidx = gt.global_index(indices)
        tgt = gt.vectors(self.codec)[gidx]
        if self.codec.loss_type == "l1":
            if self.vector_loss_norm == "mean":
                loss = F.l1_loss(src, tgt, reduction="sum") / (num_matched * src.shape[1])
            else:
                loss = F.l1_loss(src, tgt, reduction="sum") / num_boxes
            if self.vector_dice:
                crops = gt.crops(self.codec.resolution)[gidx].flatten(1)
                dice = dice_loss(self.codec.decode(src).flatten(1), crops, squared=True, eps=1e-5) / num_boxes
                return {"loss_vector": self.vector_loss_coef * loss, "loss_vector_dice": dice}
        else:  # mse_dice: whitened-code MSE + dice on the decoded map (as in the authors' release)
            feat = F.mse_loss(src, tgt, reduction="sum") / num_boxes / src.shape[1]
            probs = self.codec.decode(src).flatten(1)
            crops = gt.crops(self.codec.resolution)[gidx].flatten(1)
            loss = feat + dice_loss(probs, crops, squared=True, eps=1e-5) / num_boxes
        return {"loss_vector": self.vector_loss_coef * loss}

    def loss_masks(self, outputs, targets, indices, num_boxes, gt):
        """SQR: sigmoid focal (mean over pixels) + dice on mask logits upsampled to the GT mask size,
        each summed over matched pairs / num_boxes. GT masks are zero-padded to the batch's largest. The logits
        come from ``outputs["pred_masks"]`` [B,Q,h,w] or, computed for the matched queries only, from
        ``outputs["pred_masks_for"](batch_idx, query_idx)`` -> [k,h,w]."""
        if "pred_masks" in outputs:
            pred = outputs["pred_masks"]
            src = pred[_src_index(indices, pred.device)]  # [k, h, w]
        elif "pred_masks_for" in outputs:  # the model runs its mask head on the matched queries alone
            batch, query = _src_index(indices, outputs["pred_logits"].device)
            # with no match, query 0's mask times 0 keeps the head in the graph (DDP wants every gradient)
            pred = outputs["pred_masks_for"](batch, query) if len(batch) else \
                outputs["pred_masks_for"](batch.new_zeros(1), query.new_zeros(1))
            src = pred[: len(batch)]
        else:
            raise KeyError("SetCriterion: the 'masks' loss needs outputs['pred_masks'] or 'pred_masks_for' "
                           "(model.mode sqr)")
        if len(src) == 0:
            zero = 0.0 * pred.sum()
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        H = max(t["masks"].shape[-2] for t in targets)
        W = max(t["masks"].shape[-1] for t in targets)
        tgt = torch.cat([F.pad(t["masks"][j.to(t["masks"].device)], (0, W - t["masks"].shape[-1],
                                                                      0, H - t["masks"].shape[-2]))
                         for t, (_, j) in zip(targets, indices)]).to(pred.device).flatten(1).float()
        src = F.interpolate(src[:, None].float(), size=(H, W), mode="bilinear", align_corners=False).flatten(1)
        loss_mask = sigmoid_focal_loss(src, tgt, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                       reduction="none").mean(1).sum() / num_boxes
        loss_dice = dice_loss(src.sigmoid(), tgt) / num_boxes
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    # ---- the whole thing -------------------------------------------------------------------------
    @staticmethod
    def num_boxes(targets: list[dict], device) -> float:
        """GT boxes in the batch, summed over processes / world size, clamped to >= 1."""
        return SetCriterion._process_average(sum(len(t["labels"]) for t in targets), device)

    @staticmethod
    def _process_average(count: int, device) -> float:
        """``count`` summed over processes / world size (itself in one process), clamped to >= 1."""
        n = torch.tensor([float(count)], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(n.item() / world, 1.0)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Compute all loss terms.

        Args:
            outputs: the model's dict: ``pred_logits`` [B,Q,C], ``pred_boxes`` [B,Q,4], ``pred_vectors``
                [B,Q,n_k] (uqr), ``pred_masks`` [B,Q,h,w] (sqr), ``aux_outputs`` (list of L-1 dicts),
                ``enc_outputs`` (two-stage).
            targets: B dicts with ``labels`` [n], ``boxes`` [n,4] normalised cxcywh and, for vector or
                mask losses, ``masks`` bool [n,H,W] and ``boxes_xyxy`` [n,4] absolute pixels.
        Returns:
            dict of scalar tensors: the keys of ``self.weight_dict`` that apply plus ``class_error``.
        """
        device = outputs["pred_logits"].device
        aux = outputs.get("aux_outputs", [])
        if aux and len(aux) != self.num_dec_layers - 1:
            raise ValueError(f"SetCriterion: outputs have {len(aux)} aux_outputs, expected "
                             f"num_dec_layers - 1 = {self.num_dec_layers - 1}")
        num_boxes = self.num_boxes(targets, device)
        gt = _GroundTruth(targets, device)
        losses = self._decoder_losses(outputs, targets, gt, num_boxes, "")
        if "one2many_outputs" in outputs:
            if not self.one2many:
                raise ValueError("SetCriterion: outputs have 'one2many_outputs' but the criterion was built with "
                                 "one2many=False (model.num_queries_one2many > 0 needs it)")
            rep = gt.repeated(self.one2many_k)
            losses.update(self._decoder_losses(outputs["one2many_outputs"], rep.targets, rep,
                                               self.num_boxes(rep.targets, device), "_one2many"))
        if "dn_outputs" in outputs:
            dn = outputs["dn_outputs"]
            n_max = int(dn["dn_pad"])
            groups = dn["pred_logits"].shape[1] // n_max
            rep = gt.repeated(groups)
            # fixed matching: copy j of image b in group g (query g*n_max + j) reconstructs object j
            indices = []
            for t in targets:
                n = len(t["labels"])
                q = (torch.arange(groups)[:, None] * n_max + torch.arange(n)[None]).flatten()
                indices.append((q, torch.arange(groups * n)))
            losses.update(self._decoder_losses(dn, rep.targets, rep, self.num_boxes(rep.targets, device), "_dn",
                                               indices=indices))
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            enc_gt = gt.repeated(self.enc_one2many_k) if self.enc_one2many_k > 1 else gt
            # class-agnostic proposals: every GT is class 0 (as in the authors' release)
            enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in enc_gt.targets]
            enc_boxes = num_boxes if enc_gt is gt else self.num_boxes(enc_targets, device)
            indices = self.matcher(enc, enc_targets)
            for name in self._layer_losses(None):
                terms = getattr(self, f"loss_{name}")(enc, enc_targets, indices, enc_boxes, enc_gt)
                losses.update({k + "_enc": v for k, v in terms.items()})
        return losses

    def _decoder_losses(self, outputs: dict, targets: list[dict], gt: _GroundTruth, num_boxes: float,
                        group: str, indices=None) -> dict:
        """Every decoder layer's loss terms of one query group (``group`` "" for the main one, whose last
        layer also logs ``class_error``; "_one2many" for the hybrid group and "_dn" for the denoising queries,
        which have no mask loss). ``indices``: a fixed matching for every layer instead of the matcher's."""
        losses = {}
        aux = outputs.get("aux_outputs", [])
        layers = [(outputs, self.num_dec_layers - 1, "")] + [(a, i, f"_{i}") for i, a in enumerate(aux)]
        for out, layer, suffix in layers:
            matched = indices if indices is not None else self.matcher(out, targets)
            for name in self._layer_losses(layer):
                if group and name == "masks":
                    continue
                kwargs = {"log": True} if name == "labels" and suffix == "" and not group else {}
                terms = getattr(self, f"loss_{name}")(out, targets, matched, num_boxes, gt, **kwargs)
                losses.update({k if k == "class_error" else k + suffix + group: v for k, v in terms.items()})
        return losses


def build_criterion(cfg, codec, num_classes: int) -> SetCriterion:
    """SetCriterion from a Config: losses by ``cfg.model.mode`` (uqr: labels, boxes, vectors; det:
    labels, boxes; sqr: labels, boxes, masks) and weights from ``cfg.loss``."""
    mode = cfg.model.mode
    losses = {"uqr": ("labels", "boxes", "vectors"), "det": ("labels", "boxes"),
              "sqr": ("labels", "boxes", "masks")}.get(mode)
    if losses is None:
        raise ValueError(f"build_criterion: model.mode {mode!r} is not uqr, sqr or det")
    L = cfg.loss
    weights = {"loss_ce": L.cls_loss_coef, "loss_bbox": L.bbox_loss_coef, "loss_giou": L.giou_loss_coef,
               "loss_vector": 1.0,  # vector_loss_coef is applied inside the term (as the release)
               "loss_mask": L.mask_loss_coef, "loss_dice": L.dice_loss_coef}
    return SetCriterion(num_classes, build_matcher(cfg), codec=codec if mode == "uqr" else None,
                        losses=losses, weight_dict=weights, focal_alpha=L.focal_alpha,
                        vector_loss_coef=L.vector_loss_coef, vector_loss_norm=L.vector_loss_norm,
                        vector_loss_stages=L.vector_loss_stages, num_dec_layers=cfg.model.dec_layers,
                        one2many=cfg.model.num_queries_one2many > 0, one2many_k=L.one2many_k,
                        one2many_weight=L.one2many_weight, enc_one2many_k=L.enc_one2many_k, cls_loss=L.cls_loss,
                        denoising=cfg.model.dn_groups > 0,
                        vector_dice_coef=L.vector_dice_coef if mode == "uqr" else 0.0)
