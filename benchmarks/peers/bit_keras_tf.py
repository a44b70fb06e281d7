"""bit_keras on TensorFlow, as a user runs it: `predict_on_batch` for inference, `Trainer.fit` for training (under the
distribution strategy and dtype policy asked for); and what the CPU benchmark measures of it alone: its convolutions,
its input pipeline, and a mixed policy's logits against float32's.

`args` holds the CPU benchmark's settings (`benchmark.py`'s flags)."""

import os
import tempfile
import time

from benchmarks import harness

PIPELINE_CLASSES = 10
PIPELINE_SIZES = ((240, 360), (320, 480))  # generated JPEGs: height and width drawn from these ranges


def set_threads(threads, cpu_devices=1):
    """TensorFlow's intra- and inter-op threads and logical CPU devices: before any TensorFlow op."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def _strategy(args):
    from bit_keras.training.strategy import make_strategy

    set_threads(args.threads, args.cpu_devices)
    return make_strategy(args.strategy)


def build(args, dtype=None):
    """A randomly initialized bit_keras model of `args.arch` under the dtype policy, and its build seconds."""
    from bit_keras.models import zoo

    start = time.perf_counter()
    model = zoo.create_model(args.arch, num_classes=args.num_classes, dtype=dtype or args.dtype)
    return model, time.perf_counter() - start


def inference(args, fold=False):
    """`model.predict_on_batch` of a fixed batch (it returns numpy: each call waits for its result)."""
    with _strategy(args).scope():
        model, build_s = build(args)
        if fold:
            model = model.fold_weight_standardization()
        model.compile(jit_compile=args.xla)
    images, _ = harness.random_batch(args.batch, args.resolution, args.num_classes)
    result = harness.timed_repetitions(lambda: model.predict_on_batch(images), args.schedule, args.batch)
    return {**result, "resolution": args.resolution, "build_s": build_s, "params": model.count_params()}


def training(args):
    """One `Trainer.fit` call (`compile_sgd`, as `bit-keras finetune` trains) on a repeated in-memory batch, each
    step's end recorded after waiting for its loss (TensorFlow runs steps asynchronously)."""
    import keras
    import tensorflow as tf

    from bit_keras.training import hyperrule
    from bit_keras.training.trainer import Trainer

    class StepEnds(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            self.ends.append(time.perf_counter())

    with _strategy(args).scope():
        model, build_s = build(args)
        trainer = Trainer(model)
        trainer.compile_sgd(hyperrule.scaled_lr(args.train_batch), hyperrule.MOMENTUM, jit_compile=args.xla)
    images, labels = harness.random_batch(args.train_batch, args.train_resolution, args.num_classes)
    data = tf.data.Dataset.from_tensors((images, tf.one_hot(labels, args.num_classes))).repeat()
    timer = StepEnds()
    start = time.perf_counter()
    trainer.fit(data, steps_per_epoch=args.schedule.calls, epochs=1, verbose=0, callbacks=[timer])
    result = harness.repetition_rates(start, timer.ends, args.schedule, args.train_batch)
    return {**result, "resolution": args.train_resolution, "build_s": build_s, "params": model.count_params()}


def convolution_steps(problems):
    """For each `(input shape NHWC, kernel shape HWIO, stride)`: a step of `tf.nn.conv2d`, forward and both
    gradients for a fixed output gradient."""
    import tensorflow as tf

    def problem_step(input_shape, kernel_shape, stride):
        images, kernel = tf.random.normal(input_shape), tf.random.normal(kernel_shape)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch([images, kernel])
                outputs = tf.nn.conv2d(images, kernel, stride, "VALID")
            return tape.gradient(outputs, [images, kernel], output_gradients=tf.ones_like(outputs))

        return lambda: [g.numpy() for g in step()]

    return [problem_step(*p) for p in problems]


def pipeline(args):
    """Decoded + augmented images/s of `bit_keras.data.pipeline.train_batches` (uncached) on a generated JPEG
    folder; one repetition is about a pass over it."""
    set_threads(args.threads, args.cpu_devices)
    import tensorflow as tf

    from bit_keras.data import pipeline, sources
    from bit_keras.training import hyperrule

    resize, crop = hyperrule.resolution(override=args.train_resolution)
    with tempfile.TemporaryDirectory() as folder:
        images = write_jpegs(os.path.join(folder, "train"), args.pipeline_images)
        os.symlink("train", os.path.join(folder, "test"))  # the loader wants a test split; only train is timed
        loaded = sources.from_image_folder(folder)
        batches = pipeline.train_batches(loaded.train, resize, crop, args.train_batch, cache=False)
        options = tf.data.Options()
        options.threading.private_threadpool_size = args.threads
        iterator = iter(batches.with_options(options))
        per_pass = max(1, loaded.num_train // args.train_batch)
        schedule = harness.Schedule(args.schedule.warmup, args.schedule.repeats, per_pass)
        result = harness.timed_repetitions(lambda: next(iterator), schedule, args.train_batch)
    return {**result, "images": images, "resize": resize, "crop": crop, "steps_per_repetition": per_pass}


def write_jpegs(folder, count, seed=0):
    """About `count` JPEGs of varied sizes in PIPELINE_CLASSES class folders: smooth random colour fields
    plus noise (photo-like entropy, unlike pure noise); returns how many were written."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    per_class = -(-count // PIPELINE_CLASSES)
    (h_lo, h_hi), (w_lo, w_hi) = PIPELINE_SIZES
    for c in range(PIPELINE_CLASSES):
        os.makedirs(os.path.join(folder, f"class{c}"))
        for i in range(per_class):
            height, width = int(rng.integers(h_lo, h_hi + 1)), int(rng.integers(w_lo, w_hi + 1))
            coarse = rng.random((height // 32 + 2, width // 32 + 2, 3), dtype=np.float32) * 255
            image = tf.image.resize(coarse, (height, width)) + rng.normal(0, 8, (height, width, 3))
            encoded = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90)
            tf.io.write_file(os.path.join(folder, f"class{c}", f"{i:04d}.jpg"), encoded)
    return per_class * PIPELINE_CLASSES


def parity(args):
    """max |logits under the policy - float32 logits| / max |float32 logits|, same random weights and images."""
    set_threads(args.threads, args.cpu_devices)
    import numpy as np

    reference, _ = build(args, dtype="float32")
    head = reference.output_dense  # BiT heads start at zero: random ones give comparable logits
    fan_in = head.kernel.shape[0]
    head.kernel.assign(np.random.default_rng(1).normal(0, fan_in**-0.5, head.kernel.shape).astype(np.float32))
    mixed, _ = build(args)
    mixed.set_weights(reference.get_weights())
    images, _ = harness.random_batch(args.batch, args.resolution, args.num_classes)
    expected, actual = reference.predict_on_batch(images), mixed.predict_on_batch(images)
    scale = float(np.abs(expected).max())
    return {"relative_max_diff": float(np.abs(actual - expected).max()) / scale, "max_abs_fp32_logit": scale}
