"""Detection data sources: the generated digit canvases, local COCO folders, tfds COCO 2017 and VOC (mocked)."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from bit_keras.detection import data
from tests.test_cli import message_lines, run_in_process


def _examples(dataset):
    return list(dataset.as_numpy_iterator())


def _check_example(example, num_classes):
    boxes, classes = example["boxes"], example["classes"]
    assert example["image"].dtype == np.uint8 and example["image"].ndim == 3 and example["image"].shape[-1] == 3
    assert boxes.dtype == np.float32 and boxes.shape == (len(classes), 4) and classes.dtype == np.int64
    assert (
        np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    )
    assert np.all((classes >= 0) & (classes < num_classes)) and example["image_id"].dtype == np.int64


# --- digit canvases -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canvases():
    d = data.load()
    return d, _examples(d.train), _examples(d.test)


def test_digit_canvases_sizes_classes_and_boxes(canvases):
    d, train, test = canvases
    assert (d.name, d.num_train, d.size_source, d.image_size) == ("digit-canvases", 1000, "generated", (128, 128))
    assert d.class_names == [str(c) for c in range(10)] and d.num_classes == 10
    assert (len(train), len(test)) == (1000, 250) and int(d.train.cardinality()) == 1000
    assert int(d.test.cardinality()) == 250
    assert d.train.element_spec["boxes"].shape.as_list() == [None, 4]
    for split in (train, test):
        assert sorted(int(e["image_id"]) for e in split) == list(range(len(split)))
        counts = np.bincount([len(e["classes"]) for e in split], minlength=5)
        assert len(counts) == 5 and counts[0] > 0 and counts[4] > 0  # 0 to 4 digits, some canvases empty
        assert counts[0] < 0.06 * len(split)
        for e in split:
            _check_example(e, 10)
            assert e["image"].shape == (128, 128, 3)
            heights = (e["boxes"][:, 2] - e["boxes"][:, 0]) * 128
            assert np.all(heights <= 56)
    all_classes = np.concatenate([e["classes"] for e in train])
    assert set(all_classes.tolist()) == set(range(10))


def test_digit_canvases_deterministic(canvases):
    d, train, test = canvases
    again = data.embedded_digit_canvases()
    counts = {"kind": "digit_canvases", "train": 1000, "test": 250}
    assert {k: v for k, v in d.fingerprint.items() if k != "sha256"} == counts
    assert again.fingerprint == d.fingerprint and json.loads(json.dumps(d.fingerprint)) == d.fingerprint
    for first, second in ((train, _examples(again.train)), (test, _examples(again.test))):
        for a, b in zip(first, second, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_digit_canvases_boxes_are_tight_and_test_digits_unseen(canvases):
    """Regenerated with their backgrounds: pixels outside every box are the background's, and each box's outer
    rows and columns hold changed pixels; the classes are the pasted digits' and no test digit is a train one."""
    _, train, test = canvases
    digits = load_digits()
    examples = {"train": iter(train), "test": iter(test)}
    used = {"train": set(), "test": set()}
    for split, background, image, boxes, digit_ids in data._canvases(digits.images):
        e = next(examples[split])
        np.testing.assert_array_equal(e["image"], image)
        np.testing.assert_array_equal(e["boxes"] * 128, boxes)
        np.testing.assert_array_equal(e["classes"], digits.target[digit_ids])
        changed = np.any(image != background, axis=-1)
        outside = np.ones((128, 128), bool)
        for ymin, xmin, ymax, xmax in boxes.astype(int):
            outside[ymin:ymax, xmin:xmax] = False
            inside = changed[ymin:ymax, xmin:xmax]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not changed[outside].any()
        used[split].update(digit_ids)
    assert next(examples["train"], None) is None and next(examples["test"], None) is None
    assert not used["train"] & used["test"]
    assert len(used["test"]) > 200 and len(used["train"]) > 1000


def test_load_dispatch_and_bundled():
    assert list(data.BUNDLED) == ["digit-canvases"] and data.BUNDLED["digit-canvases"] is data.embedded_digit_canvases
    with pytest.raises(ValueError, match="not both"):
        data.load("coco/2017", coco_folder="x")
    with pytest.raises(ValueError, match="unsupported detection dataset 'mnist'; tfds ones: coco/2017, voc/2007"):
        data.load("mnist")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        data.load(coco_folder="no_such_folder")


# --- COCO folders ---------------------------------------------------------------------------------


def _png(path, width, height, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _coco(images, annotations):
    categories = [{"id": 7, "name": "dog", "supercategory": "animal"}, {"id": 3, "name": "cat"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_json(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


def _default_folder(root):
    """A CVAT-style export: images/ and annotations/instances_default.json; returns the COCO dict and pixels."""
    sizes = {5: (40, 30), 8: (20, 20), 9: (40, 30), 11: (40, 30), 12: (40, 30)}  # width, height
    pixels = {i: _png(str(root / "images" / f"{i}.png"), w, h, i) for i, (w, h) in sizes.items()}
    images = [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in sizes.items()]
    annotations = [
        {"id": 17, "image_id": 5, "category_id": 7, "bbox": [4, 6, 10, 12], "iscrowd": 0},
        {"id": 18, "image_id": 5, "category_id": 3, "bbox": [30.5, 20, 20, 20], "iscrowd": 0},  # reaches outside
        {"id": 19, "image_id": 5, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd: skipped
        {"id": 20, "image_id": 9, "category_id": 3, "bbox": [0, 0, 40, 30]},
        {"id": 21, "image_id": 11, "category_id": 7, "bbox": [2.25, 3.5, 7, 1.5]},
        {"id": 22, "image_id": 12, "category_id": 7, "bbox": [1, 2, 3, 4]},
    ]
    coco = _coco(images, annotations)
    _write_json(str(root / "annotations" / "instances_default.json"), coco)
    return coco, pixels


def test_coco_folder_single_json(tmp_path):
    _, pixels = _default_folder(tmp_path)
    d = data.from_coco_folder(str(tmp_path))
    assert d.class_names == ["cat", "dog"] and d.category_ids == [3, 7] and d.num_classes == 2
    assert (d.num_train, d.size_source, d.clipped, d.name) == (4, "counted", 1, tmp_path.name)
    train, test = _examples(d.train), _examples(d.test)
    assert (len(train), len(test)) == (4, 1) and int(d.train.cardinality()) == 4
    by_id = {int(e["image_id"]): e for e in train + test}
    assert sorted(by_id) == [5, 8, 9, 11, 12]
    assert sorted(d.files) == sorted(str(tmp_path / "images" / f"{i}.png") for i in by_id)
    for image_id, e in by_id.items():
        _check_example(e, 2)
        np.testing.assert_array_equal(e["image"], pixels[image_id])
    expected = {
        5: ([[6 / 30, 4 / 40, 18 / 30, 14 / 40], [20 / 30, 30.5 / 40, 1, 1]], [1, 0]),
        8: (np.zeros((0, 4)), []),
        9: ([[0, 0, 1, 1]], [0]),
        11: ([[3.5 / 30, 2.25 / 40, 5 / 30, 9.25 / 40]], [1]),
        12: ([[2 / 30, 1 / 40, 6 / 30, 4 / 40]], [1]),
    }
    for image_id, (boxes, classes) in expected.items():
        np.testing.assert_array_equal(by_id[image_id]["boxes"], np.array(boxes, np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(by_id[image_id]["classes"], classes)
    train_sizes = sorted((e["image"].shape[:2] for e in train), key=lambda size: size[0] * size[1])
    assert d.image_size == (train_sizes[0] if len(set(train_sizes)) == 1 else None)
    assert d.median_size == train_sizes[(len(train_sizes) - 1) // 2]  # what the resolution rules read


def test_coco_folder_train_val_jsons(tmp_path):
    pixels = {
        "train": [_png(str(tmp_path / "train2017" / f"{i}.png"), 16, 12, i) for i in range(3)],
        "val": [_png(str(tmp_path / "val2017" / "0.png"), 16, 12, 10)],
    }
    _png(str(tmp_path / "images" / "0.png"), 16, 12, 99)  # found later in the search order: unused
    for split, n in (("train", 3), ("val", 1)):
        images = [
            {"id": 100 * (split == "val") + i, "file_name": f"{i}.png", "width": 16, "height": 12} for i in range(n)
        ]
        annotations = [{"id": 1, "image_id": images[0]["id"], "category_id": 3, "bbox": [0, 0, 8, 6], "iscrowd": 0}]
        _write_json(str(tmp_path / "annotations" / f"instances_{split}2017.json"), _coco(images, annotations))
    _write_json(str(tmp_path / "annotations" / "captions_train2017.json"), {"annotations": []})
    d = data.from_coco_folder(str(tmp_path))
    train, test = _examples(d.train), _examples(d.test)
    assert (d.num_train, len(train), len(test), d.image_size, d.clipped) == (3, 3, 1, (12, 16), 0)
    assert [int(e["image_id"]) for e in train] == [0, 1, 2] and int(test[0]["image_id"]) == 100
    for e, expected in zip(train + test, pixels["train"] + pixels["val"], strict=True):
        np.testing.assert_array_equal(e["image"], expected)
    np.testing.assert_array_equal(test[0]["boxes"], [[0, 0, 0.5, 0.5]])
    assert d.train.element_spec["image"].shape == (12, 16, 3)


def test_coco_folder_fingerprint(tmp_path):
    """The annotation files' digests and the image files' as for image folders: equal for the same folder,
    different once an image or the JSON changes."""
    _default_folder(tmp_path)
    first = data.from_coco_folder(str(tmp_path)).fingerprint
    json_digest = first["annotations"]["instances_default.json"]
    assert list(first["annotations"]) == ["instances_default.json"] and len(json_digest) == 64
    assert (first["kind"], first["train"], first["test"], len(first["sha256"])) == ("coco_folder", 4, 1, 64)
    assert json.loads(json.dumps(first)) == first and data.load(coco_folder=str(tmp_path)).fingerprint == first
    assert data.from_coco_folder(str(tmp_path), seed=1).fingerprint != first
    image = tmp_path / "images" / "8.png"
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = data.from_coco_folder(str(tmp_path)).fingerprint
    assert touched["sha256"] != first["sha256"] and touched["annotations"] == first["annotations"]
    path = tmp_path / "annotations" / "instances_default.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"] = [4, 6, 10, 11]
    _write_json(str(path), coco)
    relabelled = data.from_coco_folder(str(tmp_path)).fingerprint
    assert relabelled["annotations"] != touched["annotations"] and relabelled["sha256"] == touched["sha256"]


def _broken(root, change):
    """Loads the default folder with `change(coco)` applied to its JSON."""
    coco, _ = _default_folder(root)
    change(coco)
    _write_json(str(root / "annotations" / "instances_default.json"), coco)
    return data.from_coco_folder(str(root))


def _annotation(coco, annotation_id):
    return next(a for a in coco["annotations"] if a["id"] == annotation_id)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda c: _annotation(c, 17).update(image_id=99),
            ValueError,
            "annotation 17: image 99 is not among the images",
        ),
        (
            lambda c: _annotation(c, 17).update(category_id=4),
            ValueError,
            r"annotation 17 \(image 5\): category 4 is not among the categories \[3, 7\]",
        ),
        (
            lambda c: _annotation(c, 17).update(bbox=[10, 10, 0, 5]),
            ValueError,
            r"\(image 5\): width 0 box \[10, 10, 0, 5\]",
        ),
        (lambda c: _annotation(c, 21).update(bbox=[1, 1, 5, -2]), ValueError, r"21 \(image 11\): height -2 box"),
        (
            lambda c: _annotation(c, 21).update(bbox=[1, 1, 5]),
            ValueError,
            r"annotation 21 \(image 11\): 'bbox' must be \[x, y, width, height\] of 4 numbers, got \[1, 1, 5\]$",
        ),
        (lambda c: _annotation(c, 21).update(bbox=[1, float("nan"), 5, 5]), ValueError, r"21 .*'bbox' must be"),
        (lambda c: _annotation(c, 21).update(bbox=[1, 1, True, 5]), ValueError, r"21 .*'bbox' must be"),
        (lambda c: _annotation(c, 21).update(bbox=[40, 2, 5, 5]), ValueError, "21 .* lies outside the 40x30 image"),
        (lambda c: _annotation(c, 21).pop("category_id"), ValueError, r"annotation 21 \(image 11\): no 'category_id'"),
        (lambda c: c["images"][1].update(file_name="gone.png"), FileNotFoundError, "image 8: gone.png is in none of"),
        (
            lambda c: c["images"][1].update(width=21),
            ValueError,
            "8.png: 20x20 pixels, but instances_default.json says 21x20",
        ),
        (lambda c: c["images"].append(dict(c["images"][0])), ValueError, "image id 5 appears twice"),
        (lambda c: c.pop("categories"), ValueError, "instances_default.json: not a COCO instances file"),
        # what exporters write: each refused naming the item, before any image file is looked at
        (lambda c: c.update(annotations=None), ValueError, "json: 'annotations' must be a list, got None$"),
        (
            lambda c: c["images"][1].update(id=[1, 2]),
            ValueError,
            r"json: image 1: 'id' must be an integer, got \[1, 2\]$",
        ),
        (lambda c: c["images"][0].update(id=True), ValueError, "json: image 0: 'id' must be an integer, got True$"),
        (
            lambda c: c["images"][2].update(file_name=9),
            ValueError,
            "json: image 2: 'file_name' must be a string, got 9$",
        ),
        (
            lambda c: c["images"][2].update(width=40.0),
            ValueError,
            "image 2: 'width' must be a positive integer, got 40.0$",
        ),
        (lambda c: c["images"][2].update(height=0), ValueError, "image 2: 'height' must be a positive integer, got 0$"),
        (lambda c: c["images"][3].pop("height"), ValueError, "json: image 3: no 'height'$"),
        (lambda c: c["categories"][0].update(id=[7]), ValueError, r"category 0: 'id' must be an integer, got \[7\]$"),
        (lambda c: c["categories"][1].update(name=3), ValueError, "json: category 1: 'name' must be a string, got 3$"),
        (
            lambda c: c["categories"].append({"id": 3, "name": "kitten"}),
            ValueError,
            r"json: category id 3 appears twice \('cat', 'kitten'\)$",
        ),
        (
            lambda c: c["categories"][0].update(name="hot\ndog"),
            ValueError,
            r"json: category 7: name 'hot\\ndog' holds '\\n'; names are one per line$",
        ),
        (lambda c: c["categories"][1].update(name="cat\x00"), ValueError, r"category 3: name 'cat\\x00' holds '\\x00'"),
        (
            lambda c: _annotation(c, 17).update(iscrowd="0"),
            ValueError,
            r"json: annotation 17 \(image 5\): 'iscrowd' must be 0 or 1, got '0'$",
        ),
        (lambda c: _annotation(c, 17).update(iscrowd=2), ValueError, "17 .*'iscrowd' must be 0 or 1, got 2$"),
        (lambda c: _annotation(c, 20).update(area=-1), ValueError, "20 .*'area' must be a finite number >= 0, got -1$"),
        (
            lambda c: _annotation(c, 20).update(area="12"),
            ValueError,
            "20 .*'area' must be a finite number >= 0, got '12'",
        ),
        (lambda c: _annotation(c, 20).update(image_id="9"), ValueError, "annotation 20: 'image_id' must be an integer"),
        (
            lambda c: _annotation(c, 20).update(id=[20]),
            ValueError,
            r"annotation 3: 'id' must be an integer, got \[20\]$",
        ),
        (lambda c: c["annotations"].append([1, 2]), ValueError, r"annotation 6: not an object, got \[1, 2\]$"),
        (
            lambda c: (c["images"][1].update(file_name="gone.png"), _annotation(c, 22).update(iscrowd="1")),
            ValueError,
            "annotation 22 .*'iscrowd' must be 0 or 1",  # types first: the missing file is not looked for
        ),
        # no box to train on: no annotations, or only crowd ones
        (
            lambda c: c.pop("annotations"),
            ValueError,
            "instances_default.json: no boxes to train on in the 4 training images",
        ),
        (
            lambda c: c.update(annotations=[]),
            ValueError,
            "json: no boxes to train on in the 4 training images",
        ),
        (
            lambda c: [a.update(iscrowd=1) for a in c["annotations"]],
            ValueError,
            "json: no boxes to train on in the 4 training images",
        ),
    ],
)
def test_coco_folder_bad_annotations(tmp_path, change, error, message):
    with pytest.raises(error, match=message) as raised:
        _broken(tmp_path, change)
    assert "\n" not in str(raised.value)


def test_coco_folder_crowd_flags_and_areas(tmp_path):
    """Boolean crowd flags are crowd flags; crowd objects and the JSON's areas (else w * h) reach the evaluation's
    ground truth (`test_truth`, boxes unclipped), never the examples."""
    coco, _ = _default_folder(tmp_path)
    _annotation(coco, 19).update(iscrowd=True, area=7.5)
    _annotation(coco, 17).update(iscrowd=False, area=100)
    os.remove(tmp_path / "annotations" / "instances_default.json")
    for split in ("train", "val"):
        _write_json(str(tmp_path / "annotations" / f"instances_{split}.json"), coco)
    d = data.from_coco_folder(str(tmp_path))
    truth = {t["image_id"]: t for t in d.test_truth}
    assert list(truth) == [5, 8, 9, 11, 12] and (truth[5]["height"], truth[5]["width"]) == (30, 40)
    expected = [
        [6 / 30, 4 / 40, 18 / 30, 14 / 40],
        [20 / 30, 30.5 / 40, 40 / 30, 50.5 / 40],
        [1 / 30, 1 / 40, 6 / 30, 6 / 40],
    ]
    np.testing.assert_array_equal(truth[5]["boxes"], expected)
    assert (truth[5]["classes"], truth[5]["iscrowd"], truth[5]["areas"]) == ([1, 0, 0], [0, 0, 1], [100, 400, 7.5])
    assert (truth[8]["boxes"], truth[11]["areas"]) == ([], [7 * 1.5])
    for split in (d.train, d.test):
        example = next(e for e in _examples(split) if e["image_id"] == 5)
        np.testing.assert_array_equal(example["classes"], [1, 0])  # not the crowd box
        np.testing.assert_array_equal(example["boxes"][1], np.float32([20 / 30, 30.5 / 40, 1, 1]))  # clipped


def test_coco_folder_bad_files_and_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "annotations")) + ": no such folder"):
        data.from_coco_folder(str(tmp_path))
    os.makedirs(tmp_path / "annotations")
    with pytest.raises(FileNotFoundError, match="no annotations JSON"):
        data.from_coco_folder(str(tmp_path))

    _default_folder(tmp_path)
    with open(tmp_path / "images" / "9.png", "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "images" / "9.png")) + ": not a readable"):
        data.from_coco_folder(str(tmp_path))

    path = tmp_path / "annotations" / "instances_default.json"
    _write_json(str(path), '{"images": [')
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not valid JSON"):
        data.from_coco_folder(str(tmp_path))

    _write_json(str(tmp_path / "annotations" / "other.json"), {})
    with pytest.raises(ValueError, match="expected instances_train.*found instances_default.json, other.json"):
        data.from_coco_folder(str(tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(annotations=None), "'annotations' must be a list, got None"),
        (lambda c: _annotation(c, 17).update(iscrowd="0"), r"annotation 17 \(image 5\): 'iscrowd' must be 0 or 1"),
    ],
)
def test_finetune_detector_refuses_a_bad_coco_json_in_one_line(tmp_path, change, message):
    coco, _ = _default_folder(tmp_path / "coco")
    change(coco)
    path = tmp_path / "coco" / "annotations" / "instances_default.json"
    _write_json(str(path), coco)
    result = run_in_process(
        ["finetune-detector", "--coco_folder", tmp_path / "coco", "--model", "R14x0.5", "--logdir", tmp_path / "runs"]
    )
    (line,) = message_lines(result.stderr)
    assert result.returncode == 1 and re.fullmatch(
        f"bit-keras finetune-detector: {re.escape(str(path))}: {message}.*", line
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(60)  # a FIFO opened as a file blocks until a writer comes
def test_coco_folder_reads_only_a_regular_json_of_bounded_size(tmp_path, monkeypatch):
    _default_folder(tmp_path)
    path = tmp_path / "annotations" / "instances_default.json"
    content = path.read_text()
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: a FIFO, not a regular file: only regular files are read")):
        data.from_coco_folder(str(tmp_path))
    os.remove(path)
    _write_json(str(path), content)
    monkeypatch.setattr(data, "MAX_JSON_BYTES", len(content) - 1)
    with pytest.raises(ValueError, match=re.escape(f"{path}: over the {len(content) - 1:,} bytes read as COCO")):
        data.from_coco_folder(str(tmp_path))


def test_coco_folder_training_split_without_boxes(tmp_path):
    """A training JSON without a non-crowd box is refused, naming it, even when the test split has boxes."""
    _png(str(tmp_path / "images" / "0.png"), 8, 8, 0)
    image = [{"id": 0, "file_name": "0.png", "width": 8, "height": 8}]
    crowd = [{"id": 1, "image_id": 0, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1}]
    _write_json(str(tmp_path / "annotations" / "instances_train.json"), _coco(image, crowd))
    _write_json(str(tmp_path / "annotations" / "instances_val.json"), _coco(image, [{**crowd[0], "iscrowd": 0}]))
    path = tmp_path / "annotations" / "instances_train.json"
    with pytest.raises(ValueError, match=re.escape(f"{path}: no boxes to train on in the 1 training images")):
        data.from_coco_folder(str(tmp_path))


def test_coco_folder_val_categories_must_match_and_one_image_is_too_few(tmp_path):
    _png(str(tmp_path / "images" / "0.png"), 8, 8, 0)
    image = [{"id": 0, "file_name": "0.png", "width": 8, "height": 8}]
    _write_json(str(tmp_path / "annotations" / "instances_default.json"), _coco(image, []))
    with pytest.raises(ValueError, match="instances_default.json: 1 images, too few to split"):
        data.from_coco_folder(str(tmp_path))
    os.remove(tmp_path / "annotations" / "instances_default.json")
    _write_json(str(tmp_path / "annotations" / "instances_train.json"), _coco(image, []))
    val = _coco(image, [])
    val["categories"][0]["name"] = "wolf"
    _write_json(str(tmp_path / "annotations" / "instances_val.json"), val)
    with pytest.raises(ValueError, match="instances_val.json: categories differ from instances_train.json's"):
        data.from_coco_folder(str(tmp_path))


# --- tfds -----------------------------------------------------------------------------------------


def _raw_examples(name, count):
    """Consistent random examples with the features of tfds `name` that the loader reads."""
    rng = np.random.default_rng(3)
    flag = "is_crowd" if name.startswith("coco") else "is_difficult"
    examples = []
    for i in range(count):
        n = [0, 3, 5, 1][i % 4]
        corners = np.sort(rng.uniform(0, 1, (n, 2, 2)).astype(np.float32), axis=1)
        boxes = corners.transpose(0, 2, 1).reshape(n, 4)[:, [0, 2, 1, 3]]
        if n >= 3:
            boxes[2, 2] = boxes[2, 0]  # no height: dropped
        objects = {"bbox": boxes, "label": rng.integers(0, 20, n), flag: rng.random(n) < 0.4}
        example = {"image": rng.integers(0, 256, (9 + i, 7, 3), dtype=np.uint8), "objects": objects}
        if name.startswith("coco"):
            example["image/id"] = np.int64(1000 + 7 * i)
        examples.append(example)
    return examples


def _mock(name, count, requested):
    """`tfds.testing.mock_data` yielding `_raw_examples(name, count)` for every split; splits go to `requested`."""
    examples = _raw_examples(name, count)
    signature = tf.nest.map_structure(lambda x: tf.TensorSpec([None] * np.ndim(x), tf.as_dtype(x.dtype)), examples[0])

    def as_dataset(self, split, **kwargs):
        requested.append(str(split))
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)

    return tfds.testing.mock_data(num_examples=count, as_dataset_fn=as_dataset), examples


@pytest.mark.parametrize(
    "name, default_splits", [("coco/2017", ["train", "validation"]), ("voc/2007", ["train", "test"])]
)
def test_from_tfds_drops_crowd_difficult_and_empty_boxes(name, default_splits):
    requested = []
    mock, raw = _mock(name, 6, requested)
    with mock:
        d = data.load(name)
        train, test = _examples(d.train), _examples(d.test)
        version = str(tfds.builder(name).info.version)
    assert d.fingerprint == {
        "kind": "tfds",
        "name": name,
        "version": version,
        "train_split": default_splits[0],
        "test_split": default_splits[1],
        "num_train": 6,
    }
    flag = "is_crowd" if name == "coco/2017" else "is_difficult"
    assert set(requested) == set(default_splits)
    assert (d.num_train, d.size_source, d.image_size, d.name, len(train), len(test)) == (6, "counted", None, name, 6, 6)
    assert d.num_classes == (80 if name == "coco/2017" else 20) and int(d.train.cardinality()) == 6
    dropped = 0
    for i, (e, r) in enumerate(zip(train, raw, strict=True)):
        _check_example(e, d.num_classes)
        boxes = r["objects"]["bbox"]
        keep = ~r["objects"][flag] & (boxes[:, 2] > boxes[:, 0])
        dropped += (~keep).sum()
        np.testing.assert_array_equal(e["image"], r["image"])
        np.testing.assert_array_equal(e["boxes"], boxes[keep])
        np.testing.assert_array_equal(e["classes"], r["objects"]["label"][keep])
        assert int(e["image_id"]) == (1000 + 7 * i if name == "coco/2017" else i)
    assert dropped >= 2 and sum(len(e["classes"]) for e in train) >= 2


def test_from_tfds_custom_splits():
    requested = []
    mock, _ = _mock("voc/2012", 2, requested)
    with mock:
        d = data.from_tfds("voc/2012", train_split="train[:50%]", test_split="validation")
        assert data.from_tfds("voc/2012").num_train == 2
    # the train split is read twice per load: counted (the mock has no split metadata), then loaded
    assert requested == ["train[:50%]"] * 2 + ["validation"] + ["train"] * 2 + ["validation"] and d.num_train == 2
