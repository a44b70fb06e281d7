"""Detection test data: a COCO-format folder of shapes, and a small detector's settings."""

import json
import os

import numpy as np
from PIL import Image

SMALL = dict(fpn_channels=32, head_channels=32, head_depth=1)  # a fast detector for tests


def write_coco_folder(root, images=12, size=96, seed=0):
    """A COCO-format folder (one instances JSON, as labeling tools export): squares (category 3) and wide bars
    (category 7) of random colors on noise, one image without objects."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "annotations"))
    coco = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]}
    for i in range(images):
        pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        name = f"img{i}.png"
        coco["images"].append({"id": 100 + i, "file_name": name, "width": size, "height": size})
        for k in range(0 if i == 0 else 2):
            category = (3, 7)[k]
            h, w = (28, 28) if category == 3 else (16, 48)
            y, x = int(rng.integers(0, size - h)) if k == 0 else size - h, int(rng.integers(0, size - w))
            pixels[y : y + h, x : x + w] = rng.integers(150, 256, 3)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": 100 + i,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        Image.fromarray(pixels).save(os.path.join(root, "images", name))
    with open(os.path.join(root, "annotations", "instances_default.json"), "w") as f:
        json.dump(coco, f)
    return root
