"""COCO box AP through pycocotools (the reference implementation), from normalized (ymin, xmin, ymax, xmax) boxes.

Class `c` is COCO category `c` (pycocotools accepts id 0); annotation ids start at 1, since pycocotools
treats id 0 as "unmatched".
"""

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def _xywh(boxes, height, width):
    """Normalized yxyx [N, 4] -> COCO pixel [x, y, w, h] lists."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * [height, width, height, width]
    ymin, xmin, ymax, xmax = boxes.T
    return np.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=1).tolist()


def coco_metrics(ground_truth, detections, num_classes):
    """COCO AP, AP50, AP75 and AP for small/medium/large objects (`METRIC_NAMES`), as python floats; None where
    pycocotools has no ground truth for a metric (it reports -1). Per image at most 100 detections count (COCO's
    maxDets), the highest-scoring ones.

    ground_truth: per-image dicts {"image_id", "height", "width", "boxes" [N, 4] normalized yxyx, "classes" [N]},
    optionally "iscrowd" [N] (1: an ignore region, as COCO's crowd objects; default 0) and "areas" [N] (the
    pixel areas that choose the small/medium/large range, as COCO's segment areas; default the boxes');
    detections: per-image dicts {"image_id", "boxes" [M, 4], "scores" [M], "classes" [M]}; an image may be missing.
    """
    image_ids = [int(gt["image_id"]) for gt in ground_truth]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("coco_metrics: the ground truth repeats an image_id")
    unknown = {int(d["image_id"]) for d in detections} - set(image_ids)
    if unknown:
        raise ValueError(f"coco_metrics: detections for images without ground truth: {sorted(unknown)[:10]}")

    images, annotations = [], []
    sizes = {}
    for gt in ground_truth:
        image_id, height, width = int(gt["image_id"]), int(gt["height"]), int(gt["width"])
        sizes[image_id] = height, width
        images.append({"id": image_id, "height": height, "width": width})
        boxes, classes = _xywh(gt["boxes"], height, width), np.asarray(gt["classes"]).reshape(-1)
        crowd = np.asarray(gt.get("iscrowd", np.zeros(len(boxes))), np.int64).reshape(-1)
        areas = np.asarray(gt.get("areas", [w * h for *_, w, h in boxes]), np.float64).reshape(-1)
        for bbox, cls, is_crowd, area in zip(boxes, classes, crowd, areas, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "bbox": bbox,
                    "area": float(area),
                    "iscrowd": int(is_crowd),
                }
            )
    categories = [{"id": c, "name": str(c)} for c in range(num_classes)]

    results = []
    for det in detections:
        image_id = int(det["image_id"])
        boxes, scores = _xywh(det["boxes"], *sizes[image_id]), np.asarray(det["scores"]).reshape(-1)
        for bbox, score, cls in zip(boxes, scores, np.asarray(det["classes"]).reshape(-1)):
            results.append({"image_id": image_id, "category_id": int(cls), "bbox": bbox, "score": float(score)})

    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO()
        gt_coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt_coco.createIndex()
        if results:
            dt_coco = gt_coco.loadRes(results)
        else:  # loadRes refuses an empty list: an empty result set scores 0 wherever there is ground truth
            dt_coco = COCO()
            dt_coco.dataset = {"images": images, "annotations": [], "categories": categories}
            dt_coco.createIndex()
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def ground_truth_from_dataset(dataset):
    """The `coco_metrics` ground truth of an unbatched tf.data.Dataset of {"image" [H, W, 3], "boxes" [N, 4]
    normalized yxyx, "classes" [N], "image_id"}."""
    ground_truth = []
    for example in dataset.as_numpy_iterator():
        height, width = example["image"].shape[:2]
        ground_truth.append(
            {
                "image_id": int(example["image_id"]),
                "height": int(height),
                "width": int(width),
                "boxes": np.asarray(example["boxes"], np.float32).reshape(-1, 4),
                "classes": np.asarray(example["classes"], np.int64).reshape(-1),
            }
        )
    return ground_truth
