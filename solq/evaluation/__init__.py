"""solq.evaluation: COCO box/mask AP with pycocotools, and Boundary AP."""
from .boundary import BoundaryCOCOeval, boundary_band, boundary_dilation, boundary_iou, evaluate_boundary_ap
from .coco_eval import (COCO_STAT_NAMES, IOU_TYPES, evaluate_coco, format_table, masks_to_rle,
                        predictions_to_coco_results, write_results_json)

__all__ = ["COCO_STAT_NAMES", "IOU_TYPES", "evaluate_coco", "format_table", "masks_to_rle",
           "predictions_to_coco_results", "write_results_json",
           "BoundaryCOCOeval", "boundary_band", "boundary_dilation", "boundary_iou", "evaluate_boundary_ap"]
