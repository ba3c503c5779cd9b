"""solq.evaluation: COCO box/mask AP with pycocotools."""
from .coco_eval import (COCO_STAT_NAMES, IOU_TYPES, evaluate_coco, format_table, masks_to_rle,
                        predictions_to_coco_results, write_results_json)

__all__ = ["COCO_STAT_NAMES", "IOU_TYPES", "evaluate_coco", "format_table", "masks_to_rle",
           "predictions_to_coco_results", "write_results_json"]
