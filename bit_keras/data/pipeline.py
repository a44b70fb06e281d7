"""The tf.data input pipeline of BiT training and evaluation: augmentation, MixUp, batching.

`train_batches` and `eval_batches` turn the unbatched `(image uint8 [H, W, 3], label)` splits of a
`bit_keras.data.sources.Data` into float32 batches in [0, 1]; `decode_and_resize` does BiT's evaluation
preprocessing for encoded images (serving, prediction).
"""

import tensorflow as tf

from bit_keras.data.mixup import mixup

AUTOTUNE = tf.data.AUTOTUNE
CACHE_BYTES = 1 << 30  # train_batches caches decoded images automatically up to this size
SHUFFLE_BUFFER = 1024  # train_batches' shuffle buffer (of decoded images) when the dataset is not cached


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
    plain=False,
):
    """BiT training batches: `(float32 [batch_size, crop, crop, 3] in [0, 1], labels)`.

    Each image is resized to (resize, resize) (bilinear, on [0, 1] floats), randomly cropped to
    (crop, crop) and flipped left-right with probability 1/2; labels are int64, or one-hot float32
    when `num_classes` is given. `mixup_alpha > 0` (needs `num_classes`) mixes each batch with its
    reverse, one lambda ~ Beta(alpha, alpha) per batch, into soft targets. Batches drop the remainder.
    `inception_crop=True` (upstream pretraining) instead crops a random box of 8-100% of the area and
    aspect ratio 3/4-4/3 and resizes it to (crop, crop); `resize` is then unused. `plain=True` (a distillation
    teacher's fixed view) also gives each image resized to (crop, crop) without augmentation:
    `((augmented, plain), labels)`; MixUp cannot mix it the same way and is refused.

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
    if mixup_alpha and plain:
        raise ValueError("MixUp mixes the augmented images only: it cannot go with the plain ones (plain=True)")
    examples = example_stream(dataset, batch_size, seed, start_step, cache, shuffle_buffer)

    def augment(example, i):
        image, label = example
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed(seed, i), 2))
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
            augmented = tf.image.resize(tf.slice(image, begin, size), (crop, crop))
        else:
            augmented = tf.image.resize(image, (resize, resize))
            augmented = tf.image.stateless_random_crop(augmented, (crop, crop, 3), seed=crop_seed)
        augmented = tf.image.stateless_random_flip_left_right(augmented, seed=flip_seed)
        inputs = (augmented, tf.image.resize(image, (crop, crop))) if plain else augmented
        return inputs, _target(label, num_classes)

    batches = examples.map(augment, num_parallel_calls=AUTOTUNE)
    batches = batches.batch(batch_size, drop_remainder=True)
    if mixup_alpha:
        steps_from = tf.data.Dataset.counter(start_step)
        mix = lambda batch, s: mixup(*batch, mixup_alpha, seed=_stream_seed(seed, _BATCH, s))
        batches = tf.data.Dataset.zip((batches, steps_from)).map(mix, num_parallel_calls=AUTOTUNE)
    if steps is not None:
        batches = batches.take(steps - start_step)
    return batches.prefetch(AUTOTUNE)


def example_stream(dataset, batch_size, seed=0, start_step=0, cache=None, shuffle_buffer=None):
    """The examples of `dataset` in the order training sees them from batch `start_step` of `batch_size` on,
    each paired with its position in the stream (for `example_seed`); see `train_batches`."""
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
    return tf.data.Dataset.zip((stream, tf.data.Dataset.counter(start_step * batch_size)))


def example_seed(seed, position):
    """The stateless-RNG seed of the augmentation of the example at `position` of the training stream."""
    return _stream_seed(seed, _EXAMPLE, position)


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
    size, spec = int(dataset.cardinality()), dataset.element_spec
    spec = spec["image"] if isinstance(spec, dict) else spec[0]  # detection examples, or (image, label) pairs
    if size < 0 or not spec.shape.is_fully_defined():
        return False
    return size * spec.shape.num_elements() * spec.dtype.size <= CACHE_BYTES


def _target(label, num_classes):
    """Class ids as int64, or one-hot float32 with `num_classes`; multi-hot label vectors as float32."""
    if label.shape.rank == 1:
        return tf.cast(label, tf.float32)
    label = tf.cast(label, tf.int64)
    return tf.one_hot(label, num_classes, dtype=tf.float32) if num_classes else label
