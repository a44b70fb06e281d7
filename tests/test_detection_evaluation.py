"""COCO AP through pycocotools (bit_keras.detection.evaluation) and the pictures of detections (drawing)."""

import contextlib
import errno
import io
import json
import os
import types

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bit_keras import files
from bit_keras.detection import data as data_lib
from bit_keras.detection import drawing, finetune
from bit_keras.detection.evaluation import METRIC_NAMES, coco_metrics, ground_truth_from_dataset

SIZE = 200  # px; the box below is 50 x 50 px = 2500 px^2: a "medium" COCO object (32^2 .. 96^2)
BOX = [0.25, 0.25, 0.5, 0.5]
EPS = 1e-12


def gt(image_id, boxes, classes, height=SIZE, width=SIZE):
    return {
        "image_id": image_id,
        "height": height,
        "width": width,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "classes": np.asarray(classes, np.int64),
    }


def det(image_id, boxes, scores, classes):
    return {
        "image_id": image_id,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "classes": np.asarray(classes, np.int64),
    }


def iou(a, b):
    """IoU of two yxyx boxes."""
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_perfect_prediction_scores_one():
    metrics = coco_metrics([gt(0, [BOX], [0])], [det(0, [BOX], [1.0], [0])], num_classes=1)
    assert tuple(metrics) == METRIC_NAMES
    # pycocotools' precision is tp / (tp + fp + eps): a perfect score is 1 - 2e-16.
    assert [metrics[k] for k in ("ap", "ap50", "ap75", "ap_medium")] == [pytest.approx(1.0, abs=EPS)] * 4
    assert all(type(v) is float for v in metrics.values() if v is not None)


def test_shifted_prediction_scores_by_iou():
    shift = 0.2 * (BOX[3] - BOX[1])  # 20% of the box width to the right
    shifted = [BOX[0], BOX[1] + shift, BOX[2], BOX[3] + shift]
    overlap = iou(BOX, shifted)
    assert 0.5 < overlap < 0.75  # (1 - 0.2) / (1 + 0.2) = 2/3
    metrics = coco_metrics([gt(0, [BOX], [0])], [det(0, [shifted], [0.9], [0])], num_classes=1)
    assert metrics["ap50"] == pytest.approx(1.0, abs=EPS)
    assert metrics["ap75"] == 0.0
    # A single detection matches at the IoU thresholds 0.50, 0.55, ..., 0.95 it reaches: AP 1 there, 0 elsewhere.
    expected = np.mean([overlap >= t for t in np.linspace(0.5, 0.95, 10)])
    assert expected == 0.4
    assert metrics["ap"] == pytest.approx(expected, abs=EPS)


def test_wrong_class_scores_zero():
    metrics = coco_metrics([gt(0, [BOX], [0])], [det(0, [BOX], [1.0], [1])], num_classes=2)
    assert metrics["ap"] == metrics["ap50"] == 0.0


def test_ap_is_the_mean_over_classes():
    other = [0.6, 0.6, 0.9, 0.9]
    truth = [gt(0, [BOX, other], [0, 1])]
    metrics = coco_metrics(truth, [det(0, [BOX], [1.0], [0])], num_classes=2)  # class 1 is missed
    assert metrics["ap"] == pytest.approx(0.5, abs=EPS)


@pytest.mark.parametrize("detections", [[], [det(0, np.zeros((0, 4)), [], [])]])
def test_no_detections_score_zero(detections):
    metrics = coco_metrics([gt(0, [BOX], [0]), gt(1, [], [])], detections, num_classes=1)
    assert metrics["ap"] == metrics["ap50"] == metrics["ap75"] == metrics["ap_medium"] == 0.0
    assert metrics["ap_small"] is None and metrics["ap_large"] is None


@pytest.mark.parametrize("false_positive_score, expected", [(0.9, 0.5), (0.1, 1.0)])
def test_false_positive_on_an_image_without_ground_truth(false_positive_score, expected):
    truth = [gt(0, [BOX], [0]), gt(1, [], [])]
    detections = [det(0, [BOX], [0.5], [0]), det(1, [BOX], [false_positive_score], [0])]
    # Ranked above the true positive, the false positive halves the precision at every recall; ranked below, it is free.
    assert coco_metrics(truth, detections, num_classes=1)["ap50"] == pytest.approx(expected, abs=EPS)


def test_area_ranges():
    medium = coco_metrics([gt(0, [BOX], [0])], [det(0, [BOX], [1.0], [0])], num_classes=1)
    assert medium["ap_small"] is None and medium["ap_large"] is None
    assert medium["ap_medium"] == pytest.approx(1.0, abs=EPS)
    small_box, large_box = [0.1, 0.1, 0.2, 0.2], [0.0, 0.0, 0.9, 0.9]  # 20 x 20 px and 180 x 180 px
    truth = [gt(0, [small_box, large_box], [0, 0])]
    metrics = coco_metrics(truth, [det(0, [small_box], [1.0], [0])], num_classes=1)
    assert metrics["ap_small"] == pytest.approx(1.0, abs=EPS)
    assert metrics["ap_large"] == 0.0 and metrics["ap_medium"] is None


def test_areas_are_in_pixels_of_each_image():
    # The same normalized box is 20 x 10 = 200 px^2 (small) on a 100 x 100 image, 200 x 100 px (large) on 1000 x 1000.
    box = [0.2, 0.3, 0.4, 0.4]
    truth = [gt(1, [box], [0], height=100, width=100), gt(2, [box], [0], height=1000, width=1000)]
    metrics = coco_metrics(truth, [det(2, [box], [1.0], [0])], num_classes=1)  # only the large one is found
    assert metrics["ap_small"] == 0.0 and metrics["ap_medium"] is None
    assert metrics["ap_large"] == pytest.approx(1.0, abs=EPS)


def test_detections_for_unknown_images_are_refused():
    with pytest.raises(ValueError, match="without ground truth"):
        coco_metrics([gt(0, [BOX], [0])], [det(7, [BOX], [1.0], [0])], num_classes=1)


def test_ground_truth_from_dataset():
    import tensorflow as tf

    examples = [
        (np.zeros((40, 60, 3), np.uint8), [[0.1, 0.1, 0.9, 0.5], [0.2, 0.5, 0.6, 1.0]], [2, 0], 11),
        (np.zeros((30, 20, 3), np.uint8), np.zeros((0, 4)), [], 12),
    ]

    def generate():
        for image, boxes, classes, image_id in examples:
            yield {
                "image": image,
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray(classes, np.int64),
                "image_id": np.int64(image_id),
            }

    signature = {
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "boxes": tf.TensorSpec([None, 4], tf.float32),
        "classes": tf.TensorSpec([None], tf.int64),
        "image_id": tf.TensorSpec([], tf.int64),
    }
    truth = ground_truth_from_dataset(tf.data.Dataset.from_generator(generate, output_signature=signature))
    assert [(t["image_id"], t["height"], t["width"]) for t in truth] == [(11, 40, 60), (12, 30, 20)]
    np.testing.assert_allclose(truth[0]["boxes"], examples[0][1])
    assert truth[0]["classes"].tolist() == [2, 0]
    assert truth[1]["boxes"].shape == (0, 4) and truth[1]["classes"].shape == (0,)
    detections = [det(t["image_id"], t["boxes"], np.ones(len(t["classes"])), t["classes"]) for t in truth]
    assert coco_metrics(truth, detections, num_classes=3)["ap"] == pytest.approx(1.0, abs=EPS)


def _write_coco_split(root, split, images, annotations):
    """`root/annotations/instances_{split}.json` of `images` ((id, width, height)) and `annotations`, and its
    images as PNGs in `root/{split}/`; categories 3 (cat) and 7 (dog). Returns the JSON's path."""
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    for image_id, width, height in images:
        Image.new("RGB", (width, height), (90, 90, 90)).save(root / split / f"{image_id}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"id": k + 1, **a} for k, a in enumerate(annotations)],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(coco))
    return path


def _pycocotools(gt_json, results):
    """COCO's own evaluation of `results` ((image id, [x, y, w, h], score, category id)) on the ground truth file
    `gt_json`, as `coco_metrics` reports it."""
    results = [{"image_id": i, "bbox": b, "score": s, "category_id": c} for i, b, s, c in results]
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO(str(gt_json))
        evaluator = COCOeval(gt_coco, gt_coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def test_coco_folder_metrics_match_pycocotools_on_the_json(tmp_path, monkeypatch):
    """Crowd objects are ignore regions, the annotations' areas choose small/medium/large and boxes are as the JSON
    has them (unclipped), as in COCO's evaluation: the numbers of the detector's evaluation are pycocotools' own."""
    _write_coco_split(tmp_path, "train", [(1, 64, 64)], [{"image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20]}])
    val = [
        {"image_id": 10, "category_id": 3, "bbox": [8, 8, 40, 40], "area": 900, "iscrowd": 0},  # small by its area
        {"image_id": 10, "category_id": 7, "bbox": [60, 10, 64, 48], "area": 2000, "iscrowd": 1},
        {"image_id": 10, "category_id": 7, "bbox": [100, 40, 40, 32], "iscrowd": 0},  # no area; reaches outside
        {"image_id": 11, "category_id": 3, "bbox": [0, 0, 32, 16], "area": 512.5, "iscrowd": 0},
        {"image_id": 11, "category_id": 3, "bbox": [32, 32, 32, 32], "area": 700, "iscrowd": True},
    ]
    val_json = _write_coco_split(tmp_path, "val", [(10, 128, 64), (11, 64, 64), (12, 64, 64)], val)
    results = [  # pixel [x, y, w, h] (the sizes are powers of 2: exact when normalized), COCO category ids
        (10, [8, 8, 40, 40], 0.9, 3),
        (10, [62, 12, 30, 30], 0.95, 7),  # on the crowd: ignored by COCO, a false positive without it
        (10, [100, 40, 28, 24], 0.8, 7),  # the clipped box exactly: IoU 0.525 with the JSON's
        (11, [2, 0, 32, 16], 0.7, 3),
        (11, [40, 40, 16, 16], 0.99, 3),  # on the crowd
        (12, [10, 10, 20, 20], 0.3, 7),
    ]
    d = data_lib.from_coco_folder(str(tmp_path))
    sizes = {t["image_id"]: (t["height"], t["width"]) for t in d.test_truth}
    detections = []
    for image_id in sorted(sizes):
        (height, width), found = sizes[image_id], [r for r in results if r[0] == image_id]
        boxes = [[y / height, x / width, (y + h) / height, (x + w) / width] for _, (x, y, w, h), *_ in found]
        classes = [d.category_ids.index(c) for *_, c in found]
        detections.append(det(image_id, boxes, [s for *_, s, _ in found], classes))
    monkeypatch.setattr(finetune, "predict_dataset", lambda *_: (ground_truth_from_dataset(d.test), detections))
    recipe = finetune.DetectionRecipe("R14x0.5", 1.0, 32, 32, 1, False)
    ours = recipe.evaluate(None, d, types.SimpleNamespace(rule=types.SimpleNamespace(batch=4)))

    coco = json.loads(val_json.read_text())
    for a in coco["annotations"]:
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])  # COCOeval needs one; loadRes gives results w * h
    reference_json = tmp_path / "reference.json"
    reference_json.write_text(json.dumps(coco))
    reference = _pycocotools(reference_json, results)
    assert ours == {f"test_{name}": value for name, value in reference.items()}
    assert reference["ap_small"] is not None and reference["ap_large"] is None
    # The training boxes (no crowd, clipped, areas w * h) score otherwise:
    trained = coco_metrics(ground_truth_from_dataset(d.test), detections, d.num_classes)
    assert trained["ap"] != reference["ap"] and trained["ap_small"] != reference["ap_small"]


def test_draw_boxes_colors_the_border_and_nothing_else():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 100, (256, 256, 3), dtype=np.uint8)  # darker than the box color everywhere
    color = (255, 64, 64)
    picture = np.asarray(drawing.draw_boxes(image, [[0.25, 0.25, 0.75, 0.75]], [1], ["a", "cat"], scores=[0.5]))
    assert picture.shape == image.shape
    ring = np.zeros((256, 256), bool)
    ring[64:192, 64:192] = True
    ring[66:190, 66:190] = False  # the default width is 2 px: rows and columns 64-65 and 190-191
    assert (picture[ring] == color).all()
    changed = (picture != image).any(axis=-1)
    label = changed & ~ring
    assert label[:64, 64:].any() and not label[64:].any() and not label[:, :64].any()  # the label sits above the box
    assert (picture[label] == color).any()  # on a filled background
    np.testing.assert_array_equal(picture[66:190, 66:190], image[66:190, 66:190])


def test_draw_boxes_labels_inside_at_the_top_edge_and_upscales_small_images():
    image = np.full((32, 32, 3), 10, np.uint8)
    picture = np.asarray(drawing.draw_boxes(image, [[0.0, 0.5, 1.0, 1.0]], [0], ["dog"], color=(0, 255, 0)))
    assert picture.shape == (256, 256, 3)  # 32 px * 8
    changed = (picture != 10).any(axis=-1)
    assert not changed[:, :128].any()  # the box starts at column 128 of the upscaled image
    assert (picture[:, 128:130] == (0, 255, 0)).all() and (picture[:, 254:256] == (0, 255, 0)).all()
    assert changed[2:20, 130:160].any()  # the label, inside the box at the top


def test_save_detection_grid(tmp_path):
    square, tall = np.full((64, 64, 3), 200, np.uint8), np.full((100, 50, 3), 200, np.uint8)
    examples = [
        {"image": square, "boxes": [[0.1, 0.1, 0.5, 0.5]], "classes": [0]},
        {"image": tall, "boxes": np.zeros((0, 4)), "classes": []},
        {"image": square, "boxes": [[0.5, 0.5, 0.9, 0.9]], "classes": [1]},
    ]
    predictions = [
        {"boxes": [[0.1, 0.1, 0.5, 0.55]], "scores": [0.8], "classes": [0]},
        {"boxes": [[0.2, 0.2, 0.4, 0.4]], "scores": [0.3], "classes": [1]},
        {"boxes": np.zeros((0, 4)), "scores": [], "classes": []},
    ]
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")  # replaced
    drawing.save_detection_grid(examples, predictions, ["cat", "dog"], path, columns=2)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with Image.open(path) as grid:
        assert grid.format == "PNG"
        pixels = np.asarray(grid.convert("RGB"))
    # Cells of the largest drawn image: the 100 x 50 one upscaled 6x (its shorter side to >= 256) to 600 x 300.
    cell_h, cell_w, pad = 600, 300, drawing.PAD
    assert pixels.shape == (drawing.LEGEND_HEIGHT + 2 * cell_h + 3 * pad, 2 * cell_w + 3 * pad, 3)
    for color in (drawing.TRUE_COLOR, drawing.PREDICTED_COLOR):
        assert (pixels == color).all(axis=-1).any()
    assert (pixels[: drawing.LEGEND_HEIGHT] < 128).any()  # the legend text


def test_save_detection_grid_refuses_mismatched_lists(tmp_path):
    with pytest.raises(ValueError):
        drawing.save_detection_grid([], [], ["cat"], tmp_path / "grid.png")
    assert not list(tmp_path.iterdir())


def _grid_image():
    return Image.new("RGB", (8, 8), "white")


def test_save_png_leaves_no_temporary_when_pillow_fails(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")

    def fail(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise ValueError("encoder failed")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(ValueError, match="encoder failed"):
        drawing.save_png(_grid_image(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"] and path.read_bytes() == b"old"


def test_save_png_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "detections.png"
    save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        save(self, fp, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(files.DiskFullError) as error:
        drawing.save_png(_grid_image(), path)
    assert str(error.value).startswith(f"{path}: cannot write (No space left on device); nothing was replaced")
    assert "\n" not in str(error.value) and not list(tmp_path.iterdir())
