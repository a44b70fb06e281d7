"""Speed and memory of a bit_keras BiT model, optionally beside timm's ResNetV2 in the same run (issue #6).

    python benchmarks/benchmark.py --model R50x1 --json bench.json

Measures inference and training-step images/s (warm-up, then median/min/max of repetitions), the time to
the first training step, peak memory, the input pipeline alone and, under mixed precision, the logits'
distance to float32. Every measurement runs in a fresh subprocess of this script (the hidden `--worker`
flag), so that its peak memory and first-step time are its own. See benchmarks/README.md.
"""

import argparse
import contextlib
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # bit_keras needs it; the workers inherit it

DTYPES = ("float32", "mixed_bfloat16", "mixed_float16")
PEERS = ("auto", "timm", "none")
TASKS = ("inference", "folded", "training", "convolutions", "pipeline", "parity")
# timm's registered BiT models; other architectures are built from its ResNetV2 class with the same arguments.
TIMM_NAMES = {
    "R50x1": "resnetv2_50x1_bit",
    "R50x3": "resnetv2_50x3_bit",
    "R101x1": "resnetv2_101x1_bit",
    "R101x3": "resnetv2_101x3_bit",
    "R152x2": "resnetv2_152x2_bit",
    "R152x4": "resnetv2_152x4_bit",
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
PIPELINE_CLASSES = 10
PIPELINE_SIZES = ((240, 360), (320, 480))  # generated JPEGs: height and width drawn from these ranges
_KEEP_ALIVE = []  # torch.library.Library objects whose definitions must stay
BUSY_LOAD = 0.5  # a 1-minute load average from this on, before the run, gets a warning in the report
PEER_INSTALL = "see benchmarks/README.md for the CPU-only install of torch and timm"


# ----------------------------------------------------------------------------- command line


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv):
    """The options, with `arch` (the architecture of `--model`) added; bad values exit naming them."""
    from bit_keras.training.strategy import STRATEGIES

    p = argparse.ArgumentParser(
        description="Benchmark a bit_keras BiT model (and timm's, side by side).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="R50x1", help="architecture (R50x1, R26x0.5...) or checkpoint name; random init")
    p.add_argument("--num_classes", type=positive_int, default=1000, help="classes of the head")
    p.add_argument("--batch", type=positive_int, default=16, help="inference batch")
    p.add_argument("--resolution", type=positive_int, default=224, help="inference image size")
    p.add_argument("--train_batch", type=positive_int, default=8, help="training batch (global)")
    p.add_argument("--train_resolution", type=positive_int, default=128, help="training crop size")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions")
    p.add_argument("--steps", type=positive_int, default=2, help="batches per timed repetition")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed batches first (the first one traces)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="Keras dtype policy (timm: torch.autocast)")
    p.add_argument("--xla", action="store_true", help="compile bit_keras's steps with XLA (jit_compile=True)")
    p.add_argument(
        "--strategy", choices=STRATEGIES, default="auto", help="bit_keras.training.strategy.make_strategy name"
    )
    p.add_argument("--cpu_devices", type=positive_int, default=1, help="logical CPU devices (replicas of 'mirrored')")
    p.add_argument("--threads", type=positive_int, default=2, help="intra- and inter-op threads of TF and torch")
    p.add_argument("--peer", choices=PEERS, default="auto", help="auto: timm when installed")
    p.add_argument("--pipeline_images", type=int, default=320, help="JPEGs for the input-pipeline test; 0 skips it")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to measure")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds allowed to each measurement")
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # FRAMEWORK:TASK, run by the parent in a fresh process
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.arch = architecture(args.model)
    except ValueError as e:
        p.error(f"--model: {e}")
    if args.pipeline_images < 0:
        p.error(f"--pipeline_images must be >= 0, got {args.pipeline_images}")
    if args.worker and args.worker not in WORKERS:
        p.error(f"--worker must be one of {sorted(WORKERS)}, got {args.worker!r}")
    return args


def architecture(name):
    """The architecture of a zoo name (`"BiT-M-R50x1"` -> `"R50x1"`); ValueError naming an unknown one."""
    from bit_keras.models import zoo

    arch = zoo.CHECKPOINTS[name].arch if name in zoo.CHECKPOINTS else name
    zoo.parse_architecture(arch)
    return arch


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    peer, peer_note = resolve_peer(args.peer)
    results = {
        "machine": machine_info(),
        "versions": versions(peer),
        "settings": {**settings(args), "peer": peer, "peer_note": peer_note},
        "bit_keras": {},
    }
    if peer:
        results[peer] = {}
    for framework, task in plan(args, peer):
        results[framework][task] = measure(argv, f"{framework}:{task}", args.timeout)
    results["machine"]["load_average_end"] = os.getloadavg()
    print(markdown(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    failed = failures(results)
    if failed:
        print(f"error: {len(failed)} measurement(s) failed, see the report", file=sys.stderr)
    return 1 if failed else 0


def failures(results):
    """`"framework task failed: error"` for each failed measurement."""
    frameworks = ("bit_keras", results["settings"]["peer"])
    return [
        f"{framework} {task} failed: {result['error']}"
        for framework in frameworks
        if framework
        for task, result in results[framework].items()
        if "error" in result
    ]


def resolve_peer(choice):
    """`(peer or None, a note on why none)` for `--peer`; `--peer timm` without timm installed exits."""
    if choice == "none":
        return None, "none (--peer none)"
    installed = all(importlib.util.find_spec(m) for m in ("torch", "timm"))
    if installed:
        return "timm", None
    if choice == "timm":
        sys.exit(f"error: --peer timm, but torch and timm are not both installed: {PEER_INSTALL}")
    note = f"none: timm is not installed ({PEER_INSTALL})"
    print(f"note: no peer measured; {note}", file=sys.stderr)
    return None, note


def plan(args, peer):
    """`(framework, task)` pairs to measure, in order."""
    pairs = []
    for task in ("inference", "training", "convolutions"):
        if task in args.tasks:
            pairs.append(("bit_keras", task))
            if peer:
                pairs.append((peer, task))
        if task == "inference" and "folded" in args.tasks:
            pairs.append(("bit_keras", "folded"))
    if args.pipeline_images and "pipeline" in args.tasks:
        pairs.append(("bit_keras", "pipeline"))
    if args.dtype != "float32" and "parity" in args.tasks:
        pairs.append(("bit_keras", "parity"))
    return pairs


def measure(argv, worker, timeout):
    """Run one measurement in a fresh process of this script; its result, or `{"error": ...}`."""
    print(f"measuring {worker} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", worker, "--worker_out", out]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s (--timeout)"}
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                result = json.load(f)
        else:  # the worker died (killed for memory, say)
            result = {"error": f"the worker exited with status {proc.returncode}"}
    if "error" in result:
        print("\n".join(proc.stderr.splitlines()[-15:]), file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- machine and settings


def machine_info():
    """CPU model and flags, CPU counts, memory and load, from /proc where there is one."""
    cpuinfo = _read("/proc/cpuinfo")
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    meminfo = _read("/proc/meminfo").split()
    return {
        "cpu": fields.get("model name", platform.processor() or "unknown"),
        "cpu_flags": [f for f in CPU_FLAGS if f in fields.get("flags", "").split()],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gb": round(int(meminfo[1]) / 2**20, 1) if meminfo[:1] == ["MemTotal:"] else None,
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
    }


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def versions(peer):
    """Versions of Python and of the packages measured."""
    packages = ["tensorflow", "keras", "bit-keras", "numpy"] + (["torch", "torchvision", "timm"] if peer else [])
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def settings(args):
    keys = (
        "model arch num_classes batch resolution train_batch train_resolution repeats steps warmup dtype xla "
        "strategy cpu_devices threads pipeline_images"
    )
    return {key: getattr(args, key) for key in keys.split()}


# ----------------------------------------------------------------------------- workers (one per process)


def run_worker(args):
    """Measure `args.worker` in this (fresh) process and write its result, with the peak memory, as JSON;
    or `{"error": ...}` (exit status 1), with the traceback on stderr."""
    try:
        result = WORKERS[args.worker](args)
        result["peak_rss_mb"] = peak_rss_mb()
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {error_cause(e)}"}
    with open(args.worker_out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 1 if "error" in result else 0


def error_cause(exception):
    """The last unindented line of the message: the cause, for TensorFlow's multi-line graph errors too."""
    lines = [line for line in str(exception).splitlines() if line.strip() and not line[0].isspace()]
    return lines[-1] if lines else repr(exception)


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing), in MB."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(step, args, batch, steps=None):
    """Call `step` warmup + repeats x steps times; the first call's seconds and the repetitions' images/s."""
    steps = steps or args.steps
    start, ends = time.perf_counter(), []
    for _ in range(args.warmup + args.repeats * steps):
        step()
        ends.append(time.perf_counter())
    return summary(start, ends, args.warmup, steps, batch)


def summary(start, ends, warmup, steps, batch):
    """`first_step_s` (from `start` to the first end) and images/s over each run of `steps` after `warmup` ends."""
    rates = [batch * steps / (ends[i + steps] - ends[i]) for i in range(warmup - 1, len(ends) - 1, steps)]
    return {
        "first_step_s": ends[0] - start,
        "images_per_s": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "images_per_s_reps": rates,
        "batch": batch,
    }


def random_batch(batch, size, num_classes):
    """Fixed random float32 images in [0, 1], NHWC, and integer labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.random((batch, size, size, 3), dtype=np.float32), rng.integers(num_classes, size=batch)


def keras_threads(args):
    """TensorFlow's threads and logical CPU devices: before any TensorFlow op."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpu_devices)


def keras_strategy(args):
    """The threads set, the `--strategy`."""
    from bit_keras.training.strategy import make_strategy

    keras_threads(args)
    return make_strategy(args.strategy)


def keras_model(args):
    """A randomly initialized bit_keras model of `args.arch` under the dtype policy, and its build seconds."""
    from bit_keras.models import zoo

    start = time.perf_counter()
    model = zoo.create_model(args.arch, num_classes=args.num_classes, dtype=args.dtype)
    return model, time.perf_counter() - start


def keras_inference(args, fold=False):
    strategy = keras_strategy(args)
    with strategy.scope():
        model, build_s = keras_model(args)
        if fold:
            model = model.fold_weight_standardization()
        model.compile(jit_compile=args.xla)
    images, _ = random_batch(args.batch, args.resolution, args.num_classes)
    result = timed(lambda: model.predict_on_batch(images), args, args.batch)  # returns numpy: waits for the step
    return {**result, "resolution": args.resolution, "build_s": build_s, "params": model.count_params()}


def keras_training(args):
    strategy = keras_strategy(args)
    import keras
    import tensorflow as tf

    from bit_keras.training import hyperrule
    from bit_keras.training.trainer import Trainer

    class StepEnds(keras.callbacks.Callback):
        """The time at the end of every training step, after waiting for its loss (TF runs steps asynchronously)."""

        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            self.ends.append(time.perf_counter())

    with strategy.scope():
        model, build_s = keras_model(args)
        trainer = Trainer(model)
        trainer.compile_sgd(hyperrule.scaled_lr(args.train_batch), hyperrule.MOMENTUM, jit_compile=args.xla)
    images, labels = random_batch(args.train_batch, args.train_resolution, args.num_classes)
    targets = tf.one_hot(labels, args.num_classes)
    data = tf.data.Dataset.from_tensors((images, targets)).repeat()
    timer = StepEnds()
    start = time.perf_counter()
    steps = args.warmup + args.repeats * args.steps
    trainer.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    result = summary(start, timer.ends, args.warmup, args.steps, args.train_batch)
    return {**result, "resolution": args.train_resolution, "build_s": build_s, "params": model.count_params()}


def conv_problems(args):
    """`(input shape NHWC, kernel shape HWIO, stride)` of every convolution of `args.arch` at the training
    batch and resolution, in model order."""
    from bit_keras.models import zoo
    from bit_keras.models.layers import PreActBottleneck

    size = args.train_resolution
    model = zoo.create_model(args.arch, num_classes=0, input_shape=(size, size, 3))
    batch = args.train_batch // args.cpu_devices  # what one replica convolves
    problems = []
    for layer in model.layers:
        if isinstance(layer, PreActBottleneck):
            (_, height, width, _), (_, out_height, out_width, _) = layer.input.shape, layer.output.shape
            inputs = {  # conv_b sees its 1-pixel zero padding
                "conv_a": (height, width),
                "conv_b": (height + 2, width + 2),
                "conv_c": (out_height, out_width),
                "proj": (height, width),
            }
            for name, (h, w) in inputs.items():
                conv = getattr(layer, name)
                if conv is not None:
                    problems.append(((batch, h, w, conv.kernel.shape[2]), tuple(conv.kernel.shape), conv.strides[0]))
        elif layer.name == "root_conv":
            problems.append(((batch, *layer.input.shape[1:]), tuple(layer.kernel.shape), layer.strides[0]))
    return problems


def keras_convolutions(args):
    """Milliseconds of the model's convolutions alone per training step: each one's forward and both backward
    passes (`tf.nn.conv2d`, input and kernel gradients for a fixed output gradient), medians summed."""
    keras_threads(args)
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

    return convolutions_summary(args, [problem_step(*p) for p in conv_problems(args)])


def convolutions_summary(args, steps):
    """Times every step (warm-up, then repetitions); `step_ms`: the sum of their medians, and its parts."""
    medians = [median_ms(step, args.repeats, args.warmup) for step in steps]
    return {"step_ms": sum(medians), "convolutions": len(medians), "ms_each": medians}


def median_ms(step, repeats, warmup):
    """The median milliseconds of `repeats` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def keras_pipeline(args):
    """Decoded + augmented images/s of `bit_keras.data.pipeline.train_batches` (uncached) on a generated JPEG folder."""
    keras_threads(args)
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
        per_pass = max(1, loaded.num_train // args.train_batch)  # one repetition: about a pass over the folder
        result = timed(lambda: next(iterator), args, args.train_batch, steps=per_pass)
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


def keras_parity(args):
    """max |logits under --dtype - float32 logits| / max |float32 logits|, same random weights and images."""
    keras_threads(args)
    import numpy as np

    from bit_keras.models import zoo

    reference = zoo.create_model(args.arch, num_classes=args.num_classes, dtype="float32")
    head = reference.get_layer("head")  # BiT heads start at zero: random ones give comparable logits
    fan_in = head.kernel.shape[0]
    head.kernel.assign(np.random.default_rng(1).normal(0, fan_in**-0.5, head.kernel.shape).astype(np.float32))
    mixed, _ = keras_model(args)
    mixed.set_weights(reference.get_weights())
    images, _ = random_batch(args.batch, args.resolution, args.num_classes)
    expected, actual = reference.predict_on_batch(images), mixed.predict_on_batch(images)
    scale = float(np.abs(expected).max())
    return {"relative_max_diff": float(np.abs(actual - expected).max()) / scale, "max_abs_fp32_logit": scale}


def torch_setup(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(0)
    return torch


def import_timm(torch):
    """timm, which imports torchvision. The registry's torchvision wheel is a CUDA build whose C++ ops do not
    load beside CPU-only torch, and it then fails at import, registering fake kernels for two ops it lacks:
    declare their schemas first (timm's ResNetV2 uses no torchvision op)."""
    spec = importlib.util.find_spec("torchvision")
    if spec:
        extension = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
        try:
            torch.ops.load_library(extension[0])
        except (IndexError, OSError):
            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _KEEP_ALIVE.append(library)  # the definitions last as long as the Library object
    import timm

    return timm


def timm_model(args, torch):
    """timm's model of `args.arch` (random init) and its name."""
    timm = import_timm(torch)
    if args.arch in TIMM_NAMES:
        name = TIMM_NAMES[args.arch]
        return timm.create_model(name, num_classes=args.num_classes), name
    import functools

    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    from bit_keras.models import zoo

    units, width = zoo.parse_architecture(args.arch)
    model = ResNetV2(  # the arguments of timm's *_bit models
        layers=list(units),
        width_factor=width,
        num_classes=args.num_classes,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
    )
    return model, f"ResNetV2(layers={list(units)}, width_factor={width})"


def autocast(torch, dtype):
    """`torch.autocast` on the CPU for a mixed policy; nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype.removeprefix("mixed_")))


def nchw(torch, images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def timm_built(args):
    """torch (threads set), timm's model of `args.arch`, its name and build seconds."""
    torch = torch_setup(args)
    start = time.perf_counter()
    model, name = timm_model(args, torch)
    return torch, model, name, time.perf_counter() - start


def timm_inference(args):
    torch, model, name, build_s = timm_built(args)
    model.eval()
    images = nchw(torch, random_batch(args.batch, args.resolution, args.num_classes)[0])

    def step():
        with torch.inference_mode(), autocast(torch, args.dtype):
            model(images)

    result = timed(step, args, args.batch)
    return {**result, "resolution": args.resolution, "build_s": build_s, "params": _params(model), "model": name}


def timm_training(args):
    from bit_keras.training import hyperrule

    torch, model, name, build_s = timm_built(args)
    model.train()
    lr = hyperrule.scaled_lr(args.train_batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=hyperrule.MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", enabled=args.dtype == "mixed_float16")  # as Keras' LossScaleOptimizer
    images, labels = random_batch(args.train_batch, args.train_resolution, args.num_classes)
    images, labels = nchw(torch, images), torch.from_numpy(labels)

    def step():
        with autocast(torch, args.dtype):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    result = timed(step, args, args.train_batch)
    return {**result, "resolution": args.train_resolution, "build_s": build_s, "params": _params(model), "model": name}


def timm_convolutions(args):
    """The same convolutions as `keras_convolutions`, in PyTorch (NCHW, as timm runs them)."""
    torch = torch_setup(args)

    def problem_step(input_shape, kernel_shape, stride):
        n, h, w, c = input_shape
        kh, kw, cin, cout = kernel_shape
        images = torch.randn(n, c, h, w, requires_grad=True)
        kernel = torch.randn(cout, cin, kh, kw, requires_grad=True)

        def step():
            outputs = torch.nn.functional.conv2d(images, kernel, stride=stride)
            return torch.autograd.grad(outputs, [images, kernel], torch.ones_like(outputs))

        return step

    return convolutions_summary(args, [problem_step(*p) for p in conv_problems(args)])


def _params(model):
    return sum(p.numel() for p in model.parameters())


WORKERS = {
    "bit_keras:inference": keras_inference,
    "bit_keras:folded": lambda args: keras_inference(args, fold=True),
    "bit_keras:training": keras_training,
    "bit_keras:pipeline": keras_pipeline,
    "bit_keras:parity": keras_parity,
    "timm:inference": timm_inference,
    "timm:training": timm_training,
    "bit_keras:convolutions": keras_convolutions,
    "timm:convolutions": timm_convolutions,
}


# ----------------------------------------------------------------------------- report

# (label, task, key, format[, the peer's task]); the ratio column divides bit_keras's value by the peer's.
ROWS = (
    ("inference, images/s: median [min, max]", "inference", "images_per_s", "{:.1f}"),
    (
        "inference, weight standardization folded (`fold_weight_standardization()`), images/s",
        "folded",
        "images_per_s",
        "{:.1f}",
        "inference",
    ),
    ("training step, images/s: median [min, max]", "training", "images_per_s", "{:.1f}"),
    ("first training step, s (bit_keras: from the fit call)", "training", "first_step_s", "{:.1f}"),
    ("first inference call, s", "inference", "first_step_s", "{:.1f}"),
    ("peak memory, inference, MB", "inference", "peak_rss_mb", "{:.0f}"),
    ("peak memory, training, MB", "training", "peak_rss_mb", "{:.0f}"),
    ("parameters, M", "inference", "params", "{:.2f}"),
    (
        "training convolutions alone (forward + both backward passes, tf.nn.conv2d / torch conv2d), ms per step",
        "convolutions",
        "step_ms",
        "{:.0f}",
    ),
)


def cell(result, key, fmt):
    """One table cell: the value (with [min, max] for rates), or why there is none."""
    if result is None:
        return "-"
    if "error" in result:
        return "failed"
    value = result[key] / 1e6 if key == "params" else result[key]
    text = fmt.format(value)
    if key == "images_per_s":
        text += f" [{fmt.format(result['images_per_s_min'])}, {fmt.format(result['images_per_s_max'])}]"
    return text


def ratio(ours, theirs, key):
    if not ours or not theirs or "error" in ours or "error" in theirs or not theirs[key]:
        return "-"
    return f"{ours[key] / theirs[key]:.2f}"


def markdown(results):
    """The Markdown report: machine, versions, settings, then the measurements side by side."""
    s, m, v = results["settings"], results["machine"], results["versions"]
    peer = s["peer"]
    ours, theirs = results["bit_keras"], results.get(peer, {}) if peer else {}
    load = lambda values: "/".join(f"{x:.1f}" for x in values)
    lines = [
        f"## bit_keras benchmark: {s['arch']}, {s['dtype']}{', XLA' if s['xla'] else ''}",
        "",
        f"- machine: {m['cpu']}, {m['usable_cpus']} of {m['logical_cpus']} CPUs usable, {m['memory_gb']} GB; "
        f"flags: {' '.join(m['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; "
        f"load average (1/5/15 min) {load(m['load_average_start'])} at start, {load(m['load_average_end'])} at end",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- inference: batch {s['batch']} at {s['resolution']}x{s['resolution']}; training step (forward, backward, "
        f"SGD momentum 0.9, softmax cross-entropy): batch {s['train_batch']} at "
        f"{s['train_resolution']}x{s['train_resolution']}; {s['num_classes']} classes",
        f"- {_count(s['warmup'], 'warm-up batch')}, then {_count(s['repeats'], 'repetition')} of "
        f"{_count(s['steps'], 'batch')}, each measurement in a fresh process; {_count(s['threads'], 'thread')}; "
        f"strategy {s['strategy']} over {_count(s['cpu_devices'], 'CPU device')}",
        f"- peer: {_peer_line(peer, theirs) if peer else s['peer_note']}",
        "",
        *_load_warning(m),
        f"| | bit_keras | {peer or 'peer'} | bit_keras / {peer or 'peer'} |",
        "|---|---|---|---|",
    ]
    for label, task, key, fmt, *peer_task in ROWS:
        if task not in ours:
            continue
        mine, peers = ours[task], theirs.get(peer_task[0] if peer_task else task)
        theirs_cell = cell(peers, key, fmt) if peer else "-"
        lines.append(f"| {label} | {cell(mine, key, fmt)} | {theirs_cell} | {ratio(mine, peers, key)} |")
    if "pipeline" in ours:
        lines.append(_pipeline_row(ours["pipeline"], ours.get("training")))
    if "parity" in ours:
        p = ours["parity"]
        value = "failed" if "error" in p else f"{p['relative_max_diff']:.2e}"
        lines.append(f"| {s['dtype']} vs float32 logits: max abs diff / max abs logit | {value} | - | - |")
    failed = failures(results)
    return "\n".join(lines + ([""] + [f"- {line}" for line in failed] if failed else []))


def _load_warning(machine):
    load = machine["load_average_start"][0]
    if load < BUSY_LOAD:
        return []
    return [
        f"**Warning: the load average was {load:.1f} at the start: other processes compete for the CPUs, so the "
        "timings are noisy (torch's OpenMP threads can slow down 100x when a core they spin on is taken).**",
        "",
    ]


def _peer_line(peer, theirs):
    model = next((r["model"] for r in theirs.values() if "model" in r), "?")
    return f"{peer} {model} (random init, eager, NCHW; torch.autocast for mixed policies)"


def _pipeline_row(pipeline, training):
    label = "input pipeline alone (decode + augment, uncached), images/s"
    if "error" in pipeline:
        return f"| {label} | failed | - | - |"
    label = (
        f"input pipeline alone ({pipeline['images']} JPEGs of {_span(PIPELINE_SIZES[0])}x{_span(PIPELINE_SIZES[1])}: "
        f"decode, resize {pipeline['resize']}, crop {pipeline['crop']}, flip; uncached), images/s"
    )
    text = cell(pipeline, "images_per_s", "{:.0f}")
    if training and "error" not in training:
        text += f"; {pipeline['images_per_s'] / training['images_per_s']:.1f}x the training step"
    return f"| {label} | {text} | - | - |"


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def _span(bounds):
    return "{}-{}".format(*bounds)


if __name__ == "__main__":
    sys.exit(main())
