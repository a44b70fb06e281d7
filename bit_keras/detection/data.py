"""Object-detection data sources: the offline digit canvases, local COCO-format folders, tfds COCO 2017 and VOC.

Each returns a `DetectionData` whose splits are unbatched examples `{"image": uint8 [H, W, 3], "boxes": float32
[N, 4] normalized (ymin, xmin, ymax, xmax) in [0, 1], "classes": int64 [N] in [0, num_classes), "image_id": int64}`,
decoded but not preprocessed. N may be 0 (an image that is all background); image ids are unique within a split.
"""

import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import tensorflow as tf
from PIL import Image

from bit_keras import files as files_lib
from bit_keras.checks import arg, check_int, control_character
from bit_keras.data import images as images_lib
from bit_keras.data import sources

AUTOTUNE = tf.data.AUTOTUNE
CANVAS = 128  # side of the digit canvases
_CANVAS_SPLITS = {"train": 1000, "test": 250}  # canvases per split
_CANVAS_TEST_DIGITS = 0.2  # fraction of the 1797 digit images kept for the test canvases
_DIGIT_SIDE = (28, 56)  # range of a pasted digit's height in pixels
MAX_JSON_BYTES = 4 << 30  # a COCO instances JSON read, at most (COCO 2017 train's is about 450 MB)
# tfds datasets: (default train split, default test split, the objects' flag that drops an object)
_TFDS = {
    "coco/2017": ("train", "validation", "is_crowd"),
    "voc/2007": ("train", "test", "is_difficult"),
    "voc/2012": ("train", "validation", "is_difficult"),  # VOC 2012's test split has no boxes
}
TFDS_NAMES = tuple(_TFDS)  # the tfds detection datasets read


@dataclasses.dataclass
class DetectionData(sources.Data):
    """A train/test pair of unbatched detection example datasets and what is known of them (`sources.Data`'s
    fields: `num_train` counts images, `size_source` is "generated", "counted" or "tfds metadata", `files` are the
    image files of COCO folders)."""

    clipped: int = 0  # boxes that reached outside their image and were clipped to it at load
    category_ids: list[int] | None = None  # COCO folders: the category id of each class, to write results back
    # COCO folders: the test split's `evaluation.coco_metrics` ground truth as the JSON has it, crowd objects
    # (ignore regions, never trained on), unclipped boxes and the annotations' areas included
    test_truth: list[dict] | None = None


def load(
    dataset=None, coco_folder=None, data_dir=None, train_split=None, test_split=None, max_pixels=images_lib.MAX_PIXELS
):
    """A dataset by name (a `BUNDLED` one, else tfds), or a COCO folder (with `max_pixels`), or (neither given) the
    digit canvases."""
    if dataset is not None and coco_folder is not None:
        raise ValueError("give either a detection dataset or a COCO folder, not both")
    if dataset in BUNDLED:
        return BUNDLED[dataset]()
    if dataset is not None:
        return from_tfds(dataset, train_split, test_split, data_dir=data_dir)
    if coco_folder is not None:
        return from_coco_folder(coco_folder, max_pixels=max_pixels)
    return embedded_digit_canvases()


def check_source(dataset=None, coco_folder=None):
    """A one-line error for a detection data source that cannot be loaded, found cheaply (nothing read, no network):
    a dataset that is neither bundled nor a supported tfds one, a COCO folder without its annotations folder."""
    if dataset is not None and dataset not in BUNDLED and dataset not in _TFDS:
        raise ValueError(f"unsupported detection dataset {dataset!r}; tfds ones: {', '.join(_TFDS)}")
    if coco_folder is not None and not os.path.isdir(os.path.join(coco_folder, "annotations")):
        raise FileNotFoundError(
            f"{os.path.join(coco_folder, 'annotations')}: no such folder (a COCO folder has its instances JSON there)"
        )


def embedded_digit_canvases():
    """1000 train and 250 test 128x128 canvases of scikit-learn's bundled 8x8 digits on textured backgrounds, offline.

    Each canvas holds 0 (about 3%) to 4 digits, each resized (bilinear, rounded to its 16 grey levels) to a height
    of 28-56 pixels and a width within 15% of it, placed without box overlap and blended in one bright colour
    with alpha = grey level / 16. A box is the tight box of a digit's nonzero pixels. The test canvases use a
    fixed fifth of the digit images that the train canvases never use. Deterministic; built in memory in seconds.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("embedded_digit_canvases needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    splits = {split: ([], [], []) for split in _CANVAS_SPLITS}
    for split, _, image, boxes, digit_ids in _canvases(digits.images):
        images, split_boxes, classes = splits[split]
        images.append(image)
        split_boxes.append(boxes / CANVAS)
        classes.append(digits.target[digit_ids])
    arrays = [(np.stack(images), boxes, classes) for images, boxes, classes in splits.values()]
    train, test = (_examples(images, boxes, classes, tf.identity) for images, boxes, classes in arrays)
    contents = [
        a
        for images, boxes, classes in arrays
        for a in (images, np.concatenate(boxes), np.concatenate(classes), [len(c) for c in classes])
    ]
    fingerprint = {"kind": "digit_canvases", **_CANVAS_SPLITS, "sha256": sources.arrays_digest(*contents)}
    class_names = [str(c) for c in range(10)]
    num_train = _CANVAS_SPLITS["train"]
    return DetectionData(
        train, test, class_names, num_train, "generated", (CANVAS, CANVAS), "digit-canvases", fingerprint=fingerprint
    )


# Detection datasets generated offline, loadable by name (they take precedence over tfds names).
BUNDLED = {"digit-canvases": embedded_digit_canvases}


def from_coco_folder(folder, seed=0, max_pixels=images_lib.MAX_PIXELS):
    """A local COCO-format folder, as COCO 2017 and labeling tools (CVAT, Label Studio) export it.

    The instances JSON is in `folder/annotations/`: `instances_train*.json` and `instances_val*.json` are the
    train and test splits; else its only `*.json` is split by `seed`, a fifth of its images (at least one) to test.
    An image's `file_name` is looked up in `folder/<split>/` (the JSON name after "instances_", e.g. train2017),
    `folder/images/` and `folder/`. The sorted category ids become classes 0..K-1 (`category_ids` maps them back).
    Crowd annotations (iscrowd=1) are not trained on, but the evaluation sees them, with the unclipped boxes and
    the JSON's areas, as COCO's does (`test_truth`); images without annotations are kept, with no boxes. Boxes
    reaching outside their image are clipped to it and counted in `clipped`. Everything else that is wrong (a JSON
    that is invalid, not a regular file or holds a value of the wrong type, a category id given twice or a category
    name holding a control character, an unknown image or category, a box of no width or height or wholly outside
    its image, a missing file, an image header that is unreadable, over `max_pixels` pixels or disagrees with the
    JSON's width and height, a training split without a single box) is an error naming the item, raised here,
    before any training.
    """
    check_int("max_pixels", max_pixels, required=True)
    annotations = os.path.join(folder, "annotations")
    if not os.path.isdir(annotations):
        raise FileNotFoundError(f"{annotations}: no such folder (a COCO folder has its instances JSON there)")
    jsons = sorted(f for f in os.listdir(annotations) if f.endswith(".json"))
    train_jsons = [f for f in jsons if f.startswith("instances_train")]
    val_jsons = [f for f in jsons if f.startswith("instances_val")]
    if len(train_jsons) == 1 and len(val_jsons) == 1:
        train_json = train_jsons[0]
        categories, train, clipped, train_digest = _read_coco(folder, train_json, max_pixels)
        val_categories, test, val_clipped, val_digest = _read_coco(folder, val_jsons[0], max_pixels)
        if val_categories != categories:
            raise ValueError(f"{os.path.join(annotations, val_jsons[0])}: categories differ from {train_json}'s")
        clipped += val_clipped
        digests = {train_json: train_digest, val_jsons[0]: val_digest}
    elif len(jsons) == 1:
        train_json = jsons[0]
        categories, records, clipped, digest = _read_coco(folder, train_json, max_pixels)
        digests = {train_json: digest}
        if len(records) < 2:
            raise ValueError(f"{os.path.join(annotations, train_json)}: {len(records)} images, too few to split")
        order = np.random.default_rng(seed).permutation(len(records))
        num_test = max(1, round(len(records) / 5))
        test_idx, train_idx = np.sort(order[:num_test]), np.sort(order[num_test:])
        train, test = [records[i] for i in train_idx], [records[i] for i in test_idx]
    elif not jsons:
        raise FileNotFoundError(f"{annotations}: no annotations JSON (instances_*.json)")
    else:
        raise ValueError(
            f"{annotations}: expected instances_train*.json and instances_val*.json, or a single *.json; "
            f"found {', '.join(jsons)}"
        )
    if not any(boxes for _, _, _, boxes, *_ in train):
        raise ValueError(
            f"{os.path.join(annotations, train_json)}: no boxes to train on in the {len(train)} training images "
            "(crowd annotations are not trained on)"
        )
    category_ids = sorted(categories)
    sizes = [size for _, size, *_ in train]
    files = tuple(file for file, *_ in train + test)
    name = os.path.basename(os.path.normpath(folder))
    data = [_coco_examples(records) for records in (train, test)]
    class_names = [categories[c] for c in category_ids]
    split_files = {split: [file for file, *_ in records] for split, records in (("train", train), ("test", test))}
    fingerprint = {
        "kind": "coco_folder",
        "annotations": digests,
        "train": len(train),
        "test": len(test),
        "sha256": sources.files_digest(folder, **split_files),
    }
    return DetectionData(
        *data,
        class_names,
        len(train),
        "counted",
        images_lib.common_size(sizes),
        name,
        files,
        fingerprint=fingerprint,
        median_size=images_lib.median_size(sizes),
        clipped=clipped,
        category_ids=category_ids,
        test_truth=[truth for *_, truth in test],
    )


def tfds_splits(name, train_split=None, test_split=None) -> tuple[str, str]:
    """The training and test splits of the tfds detection dataset `name`: the given ones, else its defaults."""
    defaults = _TFDS[name][:2]
    return tuple(default if split is None else split for split, default in zip((train_split, test_split), defaults))


def from_tfds(name, train_split=None, test_split=None, data_dir=None):
    """tfds `coco/2017` (splits train/validation), `voc/2007` (train/test) or `voc/2012` (train/validation).

    Crowd objects (COCO) and difficult objects (VOC) are dropped, as are boxes of no area. The image id is
    COCO's `image/id`, and for VOC the example's index in its split. `num_train` comes from the split metadata,
    or is counted (without decoding images) when that is missing.
    """
    import tensorflow_datasets as tfds

    if name not in _TFDS:
        raise ValueError(f"unsupported detection dataset {name!r}; tfds ones: {', '.join(_TFDS)}")
    train_split, test_split = tfds_splits(name, train_split, test_split)
    dropped = _TFDS[name][2]
    builder = tfds.builder(name, data_dir=data_dir)
    sources.prepare_tfds(builder, name, local=f"or use {arg('coco_folder')}")
    info = builder.info
    class_names = list(info.features["objects"]["label"].names)
    try:
        num_train, size_source = info.splits[train_split].num_examples, "tfds metadata"
    except (KeyError, ValueError):
        num_train = 0
    if not num_train:
        undecoded = builder.as_dataset(split=train_split, decoders={"image": tfds.decode.SkipDecoding()})
        num_train, size_source = int(undecoded.reduce(np.int64(0), lambda n, _: n + 1)), "counted"

    def example(index, features):
        objects, boxes = features["objects"], features["objects"]["bbox"]
        keep = ~objects[dropped] & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        image_id = features.get("image/id", index)
        return {
            "image": features["image"],
            "boxes": tf.boolean_mask(boxes, keep),
            "classes": tf.boolean_mask(objects["label"], keep),
            "image_id": tf.cast(image_id, tf.int64),
        }

    def load(split):
        return builder.as_dataset(split=split).enumerate().map(example, num_parallel_calls=AUTOTUNE)

    train = load(train_split).apply(tf.data.experimental.assert_cardinality(num_train))
    fingerprint = sources.tfds_fingerprint(name, builder, train_split, test_split, num_train)
    return DetectionData(
        train, load(test_split), class_names, num_train, size_source, None, name, fingerprint=fingerprint
    )


def _canvases(digit_images, seed=0):
    """Yields `(split, background, image, boxes, digit ids)` for every digit canvas, train then test: the uint8
    [128, 128, 3] background and canvas, the pixel boxes [N, 4] (ymin, xmin, ymax, xmax; max exclusive) and the
    indices into `digit_images` of the N digits on it."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digit_images))
    num_test = round(len(digit_images) * _CANVAS_TEST_DIGITS)
    pools = {"train": order[num_test:], "test": order[:num_test]}
    for split, count in _CANVAS_SPLITS.items():
        for _ in range(count):
            background = _background(rng)
            canvas, boxes, digit_ids = background.copy(), [], []
            for digit_id in rng.choice(pools[split], 0 if rng.random() < 0.03 else rng.integers(1, 5)):
                height = rng.integers(_DIGIT_SIDE[0], _DIGIT_SIDE[1] + 1)
                width = round(height * rng.uniform(0.87, 1.15))
                digit = Image.fromarray(digit_images[digit_id].astype(np.float32))
                alpha = np.round(np.asarray(digit.resize((width, height), Image.Resampling.BILINEAR))).clip(0, 16) / 16
                rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
                tight = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
                for _ in range(20):
                    top, left = rng.integers(0, CANVAS - height + 1), rng.integers(0, CANVAS - width + 1)
                    box = tight + [top, left, top, left]
                    if all(box[0] >= b[2] or b[0] >= box[2] or box[1] >= b[3] or b[1] >= box[3] for b in boxes):
                        break
                else:
                    continue  # no free place for this digit: leave it out
                color = rng.uniform(40, 255, 3)
                color *= rng.uniform(200, 255) / color.max()  # bright: some channel far above the background's 140
                patch = canvas[top : top + height, left : left + width]
                patch[:] = patch * (1 - alpha[..., None]) + color * alpha[..., None]
                boxes.append(box)
                digit_ids.append(digit_id)
            boxes = np.array(boxes, np.float32).reshape(-1, 4)
            yield split, np.round(background).astype(np.uint8), np.round(canvas).astype(np.uint8), boxes, digit_ids


def _background(rng):
    """A float [128, 128, 3] texture in [0, 140]: a dark base colour plus a random mix of a gradient,
    low-frequency noise and stripes or checkers."""
    y, x = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS
    background = np.broadcast_to(rng.uniform(20, 100, 3), (CANVAS, CANVAS, 3)).copy()
    if rng.random() < 0.7:
        angle = rng.uniform(0, 2 * np.pi)
        background += (np.cos(angle) * x + np.sin(angle) * y)[..., None] * rng.uniform(-30, 30, 3)
    if rng.random() < 0.7:
        grid = rng.uniform(-1, 1, (3, *[rng.integers(3, 10)] * 2)).astype(np.float32)
        noise = [np.asarray(Image.fromarray(g).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)) for g in grid]
        background += np.stack(noise, -1) * rng.uniform(10, 35)
    if rng.random() < 0.4:
        angle, frequency = rng.uniform(0, np.pi), CANVAS / rng.uniform(6, 32)
        pattern = np.sign(np.sin(2 * np.pi * frequency * (np.cos(angle) * x + np.sin(angle) * y)))
        if rng.random() < 0.5:  # checkers
            pattern *= np.sign(np.sin(2 * np.pi * frequency * (np.cos(angle) * y - np.sin(angle) * x)))
        background += pattern[..., None] * rng.uniform(5, 20, 3)
    return background.clip(0, 140)


def _read_coco(folder, json_name, max_pixels):
    """`({category id: name}, images, clipped, SHA-256 of the file)` of a COCO instances JSON in `folder/annotations`:
    images are `(file, (height, width), image id, boxes, classes, truth)` in JSON order, boxes normalized and classes
    contiguous, without crowd objects; `truth` is the image's `evaluation.coco_metrics` ground truth, with them."""
    path = os.path.join(folder, "annotations", json_name)
    content = files_lib.read_regular(path, what="COCO annotations", max_bytes=MAX_JSON_BYTES)
    try:
        coco = json.loads(content.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    _check_types(coco, path)
    categories = {}
    for category in coco["categories"]:
        category_id, name = category["id"], category["name"]
        if category_id in categories:
            raise ValueError(f"{path}: category id {category_id} appears twice ({categories[category_id]!r}, {name!r})")
        if (character := control_character(name)) is not None:
            raise ValueError(f"{path}: category {category_id}: name {name!r} holds {character}; names are one per line")
        categories[category_id] = name
    index = {c: k for k, c in enumerate(sorted(categories))}

    dirs = [os.path.join(folder, d) for d in (json_name.removesuffix(".json").removeprefix("instances_"), "images", "")]
    images = {}
    for entry in coco["images"]:
        image_id, file_name, size = entry["id"], entry["file_name"], (entry["height"], entry["width"])
        if image_id in images:
            raise ValueError(f"{path}: image id {image_id} appears twice")
        file = next((f for f in (os.path.join(d, file_name) for d in dirs) if os.path.isfile(f)), None)
        if file is None:
            raise FileNotFoundError(f"{path}: image {image_id}: {file_name} is in none of {', '.join(dirs)}")
        if (actual := images_lib.image_size(file, max_pixels)) != size:
            height, width = actual
            raise ValueError(f"{file}: {width}x{height} pixels, but {json_name} says {size[1]}x{size[0]}")
        truth = {"image_id": image_id, "height": size[0], "width": size[1]}
        truth |= {"boxes": [], "classes": [], "iscrowd": [], "areas": []}
        images[image_id] = (file, size, image_id, [], [], truth)

    clipped = 0
    for i, annotation in enumerate(coco.get("annotations", [])):
        where = f"{path}: annotation {annotation.get('id', i)}"
        image_id = annotation["image_id"]
        if image_id not in images:
            raise ValueError(f"{where}: image {image_id} is not among the images")
        where = f"{where} (image {image_id})"
        category = annotation["category_id"]
        if category not in index:
            raise ValueError(f"{where}: category {category} is not among the categories {sorted(categories)}")
        x, y, w, h = bbox = annotation["bbox"]
        if w <= 0 or h <= 0:
            side = "height" if w > 0 else "width"
            raise ValueError(f"{where}: {side} {h if w > 0 else w} box {bbox}")
        file, (height, width), _, boxes, classes, truth = images[image_id]
        corners = (max(y, 0), max(x, 0), min(y + h, height), min(x + w, width))
        if corners[2] <= corners[0] or corners[3] <= corners[1]:
            raise ValueError(f"{where}: box {bbox} lies outside the {width}x{height} image {file}")
        crowd = int(annotation.get("iscrowd", 0))
        truth["boxes"].append([y / height, x / width, (y + h) / height, (x + w) / width])
        truth["classes"].append(index[category])
        truth["iscrowd"].append(crowd)
        truth["areas"].append(annotation.get("area", w * h))  # COCOeval needs one: w * h, as loadRes gives results
        if not crowd:
            clipped += corners != (y, x, y + h, x + w)
            boxes.append(np.array(corners) / [height, width, height, width])
            classes.append(index[category])
    return categories, list(images.values()), clipped, hashlib.sha256(content).hexdigest()


def _finite(value):
    return type(value) in (int, float) and abs(value) <= sys.float_info.max  # NaN compares False


_INT = (lambda v: type(v) is int, "an integer")  # bool is no int here
_NAME = (lambda v: isinstance(v, str), "a string")
_SIDE = (lambda v: type(v) is int and v > 0, "a positive integer")
_BOX = (lambda v: isinstance(v, list) and len(v) == 4 and all(map(_finite, v)), "[x, y, width, height] of 4 numbers")
_CROWD = (lambda v: type(v) in (int, bool) and v in (0, 1), "0 or 1")
_AREA = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
_SCHEMA = {  # section of a COCO instances file: (its entries, {field: (check, what it must be)}, optional fields)
    "images": ("image", {"id": _INT, "file_name": _NAME, "width": _SIDE, "height": _SIDE}, ()),
    "categories": ("category", {"id": _INT, "name": _NAME}, ()),
    "annotations": (
        "annotation",
        {"id": _INT, "image_id": _INT, "category_id": _INT, "bbox": _BOX, "iscrowd": _CROWD, "area": _AREA},
        ("id", "iscrowd", "area"),
    ),
}


def _check_types(coco, path):
    """A one-line ValueError naming the first entry of the COCO instances `coco` (read from `path`) that misses a
    field or holds one of the wrong type; annotations are named by their id and image where those are valid."""
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"{path}: not a COCO instances file (no 'images' and 'categories' lists)")
    if not isinstance(coco.get("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' must be a list, got {_shown(coco['annotations'])}")
    for section, (kind, fields, optional) in _SCHEMA.items():
        for i, entry in enumerate(coco.get(section, [])):
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: {kind} {i}: not an object, got {_shown(entry)}")
            kind_i = f"{kind} {i}"
            if kind == "annotation" and type(entry.get("id")) is int:
                image_id = entry.get("image_id")
                kind_i = f"annotation {entry['id']}" + (f" (image {image_id})" if type(image_id) is int else "")
            for field, (valid, what) in fields.items():
                if field not in entry:
                    if field not in optional:
                        raise ValueError(f"{path}: {kind_i}: no {field!r}")
                elif not valid(entry[field]):
                    raise ValueError(f"{path}: {kind_i}: {field!r} must be {what}, got {_shown(entry[field])}")


def _shown(value, limit=80):
    """`repr(value)`, shortened to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coco_examples(records):
    """Examples decoding the image files of `records` (`(file, size, image id, boxes, classes, truth)`)."""
    sizes = {size for _, size, *_ in records}
    shape = (*sizes.pop(), 3) if len(sizes) == 1 else (None, None, 3)

    def decode(file):
        return tf.ensure_shape(tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False), shape)

    files, _, image_ids, boxes, classes, _ = zip(*records)
    return _examples(np.array(files), boxes, classes, decode, image_ids)


def _examples(sources, boxes, classes, load_image, image_ids=None):
    """Examples from per-image `sources` (decoded by `load_image`), their boxes [N_i, 4] and classes [N_i];
    the image ids are the indices unless given."""
    counts = [len(c) for c in classes]
    ends = np.cumsum(counts, dtype=np.int64)
    all_boxes = tf.constant(np.concatenate([np.zeros((0, 4)), *[np.reshape(b, (-1, 4)) for b in boxes]]), tf.float32)
    all_classes = tf.constant(np.concatenate([np.zeros(0, np.int64), *classes]), tf.int64)
    image_ids = np.arange(len(sources)) if image_ids is None else image_ids

    def example(source, start, end, image_id):
        image = load_image(source)
        return {"image": image, "boxes": all_boxes[start:end], "classes": all_classes[start:end], "image_id": image_id}

    slices = (sources, ends - counts, ends, np.asarray(image_ids, np.int64))
    return tf.data.Dataset.from_tensor_slices(slices).map(example, num_parallel_calls=AUTOTUNE)
