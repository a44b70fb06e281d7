"""bit_keras on JAX against a plain Keras 3 BiT and timm on one accelerator, in one run (issue #16).

    python benchmarks/gpu.py --json gpu.json

Measures images/s, ms per step, the first step's seconds (compilation included), peak accelerator memory and MFU of
inference and of a training step (forward, backward, SGD momentum 0.9 on softmax cross-entropy) for each peer:
bit_keras (also with weight standardization folded, for inference), a plain Keras 3 BiT built here from Keras'
GroupNormalization and a weight-standardizing Conv2D, both as jitted stateless steps on JAX, and timm's
resnetv2_50x1_bit eager and under torch.compile; in fp32 and bf16, at 224 and 480 pixels. Each measurement runs in
a fresh process of this script (the hidden `--worker` flag), so its memory peak and first step are its own, and
results are written after every one. On a machine without a GPU it runs small sizes on JAX's CPU backend. See
benchmarks/README.md.
"""

import argparse
import collections
import contextlib
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # bit_keras from this working tree, installed or not
os.environ["KERAS_BACKEND"] = "jax"  # every Keras measurement here runs on JAX
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # else JAX takes 75% of the GPU and its peak means nothing

PEERS = {
    "bit_keras": "bit_keras",
    "bit_keras_folded": "bit_keras, WS folded",
    "bit_keras_autodiff": "bit_keras, autodiff GN",
    "plain_keras": "plain Keras",
    "timm": "timm eager",
    "timm_compile": "timm + torch.compile",
}
KERAS_PEERS = ("bit_keras", "bit_keras_folded", "bit_keras_autodiff", "plain_keras")
INFERENCE_ONLY = ("bit_keras_folded",)
TRAINING_ONLY = ("bit_keras_autodiff",)  # the fast path's hand-written group norm gradient, replaced by autodiff
DTYPES = ("bf16", "fp32")  # in the order measured
TASKS = ("training", "inference")
DEVICES = ("auto", "gpu", "cpu")
TIMM_PEERS = ("timm", "timm_compile")
NUM_CLASSES = 1000
LEARNING_RATE = 0.003  # BiT-HyperRule's base rate
MOMENTUM = 0.9
BYTES_PER_GIB = 2**30
# Defaults by device: the sizes on a GPU, a smoke-test size on the CPU.
DEVICE_DEFAULTS = {
    "gpu": {"model": "R50x1", "resolutions": [224, 480], "steps": 20, "warmup": 3},
    "cpu": {"model": "R26x0.5", "resolutions": [32], "steps": 2, "warmup": 1},
}
LARGE_RESOLUTION = 224  # above it, the default batches are the HyperRule fine-tuning ones
GPU_BATCHES = {"inference": (128, 32), "training": (64, 32)}  # (up to LARGE_RESOLUTION, above it)
CPU_BATCH = 2
# The targets (bf16, 224 px, on the H200): (task, batch, images/s floor); ratio to timm + torch.compile.
TARGETS = (("training", 64, 4800), ("inference", 128, 17000))
TARGET_RATIO = 1.3
TARGET_FIRST_STEP_S = 30
# In a StableHLO line, the element types of a convolution's two operands, and of a convert's operand and result.
CONVOLUTION_TYPES = re.compile(r"stablehlo\.convolution.*:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)")
CONVERT_TYPES = re.compile(r"stablehlo\.convert .*:\s*\(tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>")


# ----------------------------------------------------------------------------- command line


class OneLineErrors(argparse.ArgumentParser):
    """An argument error is one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_range(low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        return value

    return parse


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def parse_args(argv):
    p = OneLineErrors(description="bit_keras on JAX vs plain Keras and timm on one accelerator (issue #16).")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: gpu if JAX sees one, else cpu")
    p.add_argument("--model", help="BiT architecture or checkpoint name; default R50x1 on GPU, R26x0.5 on CPU")
    p.add_argument(
        "--resolutions", nargs="+", type=int_range(32, 1024), help="image sizes; default 224 480 on GPU, 32 on CPU"
    )
    p.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, help="default: both at the first resolution, bf16 at the others"
    )
    p.add_argument(
        "--tasks", nargs="+", choices=TASKS, help="default: both at the first resolution, training at the others"
    )
    p.add_argument(
        "--peers",
        nargs="+",
        choices=PEERS,
        default=list(PEERS),
        help="bit_keras_folded measures inference only, bit_keras_autodiff training only",
    )
    p.add_argument(
        "--batch", type=int_range(1, 4096), help="inference batch; default 128 up to 224 px, 32 above, 2 on CPU"
    )
    p.add_argument(
        "--train_batch", type=int_range(1, 4096), help="training batch; default 64 up to 224 px, 32 above, 2 on CPU"
    )
    p.add_argument("--steps", type=int_range(1, 10000), help="timed steps; default 20 on GPU, 2 on CPU")
    p.add_argument(
        "--warmup", type=int_range(1, 1000), help="untimed steps first, the compiling one included; 3 on GPU, 1 on CPU"
    )
    p.add_argument("--peak_tflops", type=positive_float, default=790.0, help="peak FLOP/s for MFU, in TFLOP/s")
    p.add_argument("--worker_timeout", type=int_range(1, 3600), default=300, help="seconds per measurement")
    p.add_argument(
        "--budget_s", type=int_range(1, 86400), default=450, help="seconds for all measurements; later ones not run"
    )
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file, after each measurement")
    p.add_argument(
        "--dump_hlo", metavar="DIR", help="write each Keras training step's optimized HLO there (gzip), to read offline"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a measurement's JSON spec, run by the parent
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.dump_hlo and os.path.exists(args.dump_hlo) and not os.path.isdir(args.dump_hlo):
        p.error(f"--dump_hlo: {args.dump_hlo} is a file, not a folder")
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is imported; the workers inherit it
    args.device, args.device_name = resolve_device(args.device)
    if args.device_name is None:
        p.error("--device gpu: JAX sees no GPU")
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.arch, args.block_units, args.width = architecture(args.model)
    except ValueError as e:
        p.error(f"--model: {e}")
    return args


def architecture(name):
    """`(architecture, units per block, width)` of an architecture or checkpoint name; ValueError if unknown."""
    from bit_keras.models import zoo  # Keras, on JAX: no device is touched

    arch = zoo.CHECKPOINTS[name].arch if name in zoo.CHECKPOINTS else name
    return arch, *zoo.parse_architecture(arch)


def resolve_device(choice):
    """`(device, its name)`: "gpu" when asked for or (auto) when JAX sees one, else "cpu"; name None when a GPU was
    asked for and JAX sees none."""
    if choice == "cpu":
        return "cpu", cpu_name()
    import jax

    device = jax.devices()[0]
    if device.platform == "gpu":
        return "gpu", device.device_kind
    return ("gpu", None) if choice == "gpu" else ("cpu", cpu_name())


def cpu_name():
    from benchmark import machine_info  # this script's folder is on sys.path

    return f"{machine_info()['cpu']} ({os.cpu_count()} logical CPUs)"


# ----------------------------------------------------------------------------- the plan and its FLOPs


def default_batch(args, task, resolution):
    given = args.batch if task == "inference" else args.train_batch
    if given:
        return given
    if args.device == "cpu":
        return CPU_BATCH
    return GPU_BATCHES[task][resolution > LARGE_RESOLUTION]


def plan(args, peers):
    """The measurements, in order: bf16 before fp32 (the issue's targets are bf16's), then by resolution, training
    before inference, then by peer. Without `--dtypes` and `--tasks`, the resolutions after the first get bf16
    training alone (480 px: the HyperRule's fine-tuning)."""
    measurements = []
    for dtype in (d for d in DTYPES if d in (args.dtypes or DTYPES)):
        for index, resolution in enumerate(args.resolutions):
            tasks = args.tasks or TASKS
            if index > 0 and not (args.dtypes or args.tasks):
                tasks = ("training",) if dtype == "bf16" else ()
            for task in (t for t in TASKS if t in tasks):
                for peer in peers:
                    if peer in (INFERENCE_ONLY if task == "training" else TRAINING_ONLY):
                        continue
                    batch = default_batch(args, task, resolution)
                    measurements.append(dict(peer=peer, dtype=dtype, task=task, resolution=resolution, batch=batch))
    return measurements


def forward_flops_per_image(arch, resolution, num_classes=NUM_CLASSES):
    """2 x the multiply-adds of every convolution and of the head of a BiT `arch` at `resolution`, from its
    architecture (GroupNorm, ReLU, pooling and weight standardization are left out)."""
    from bit_keras.models import zoo

    block_units, width = zoo.parse_architecture(arch)
    root = zoo.channels(width)
    size = (resolution - 1) // 2 + 1  # the 7x7/2 root convolution, padded by 3
    macs = size * size * 7 * 7 * 3 * root
    size = (size - 1) // 2 + 1  # the 3x3/2 max pool, padded by 1
    inputs = root
    for block, units in enumerate(block_units):
        mid = root * 2**block
        for unit in range(units):
            stride = 2 if unit == 0 and block > 0 else 1
            out = (size - 1) // stride + 1
            macs += size * size * inputs * mid  # conv_a, 1x1
            macs += out * out * 3 * 3 * mid * mid  # conv_b, 3x3 with the stride
            macs += out * out * mid * 4 * mid  # conv_c, 1x1
            if unit == 0:
                macs += out * out * inputs * 4 * mid  # the projection, 1x1 with the stride
            size, inputs = out, 4 * mid
    return 2 * (macs + inputs * num_classes)


def task_flops(forward_flops, task):
    return forward_flops * (3 if task == "training" else 1)  # backward: twice the forward


# ----------------------------------------------------------------------------- the parent


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(json.loads(args.worker), args.worker_out)
    peers, missing = available_peers(args.peers)
    measurements = plan(args, peers)
    forward_flops = {r: forward_flops_per_image(args.arch, r) for r in args.resolutions}
    report = {
        "command": shlex.join(sys.orig_argv),
        "device": {"kind": args.device, "name": args.device_name},
        "versions": versions(),
        "settings": {
            "model": args.model,
            "arch": args.arch,
            "steps": args.steps,
            "warmup": args.warmup,
            "peak_tflops": args.peak_tflops,
            "worker_timeout": args.worker_timeout,
            "budget_s": args.budget_s,
        },
        "forward_flops_per_image": forward_flops,
        "not_installed": missing,
        "results": [],
    }
    print(header(report, measurements), flush=True)
    common = dict(arch=args.arch, block_units=args.block_units, width=args.width, device=args.device)
    common |= dict(steps=args.steps, warmup=args.warmup, dump_hlo=args.dump_hlo and os.path.abspath(args.dump_hlo))
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_benchmark_jax_cache_") as jax_cache:
        for number, spec in enumerate(measurements, start=1):
            print(f"[{number}/{len(measurements)}] {describe(spec)}: ", end="", flush=True)
            left = args.budget_s - (time.perf_counter() - start)
            if left <= 0:
                result = {"not_run": f"the time budget (--budget_s {args.budget_s}) was spent"}
            else:
                result = measure({**spec, **common}, min(args.worker_timeout, left), jax_cache)
            flops = task_flops(forward_flops[spec["resolution"]], spec["task"])
            result = {**spec, **result, "flops_per_image": flops}
            if "images_per_s" in result and args.device == "gpu":
                result["mfu"] = result["images_per_s"] * flops / (args.peak_tflops * 1e12)
            report["results"].append(result)
            print(progress(result), flush=True)
            if "error" in result:
                print("\n".join(result["stderr_tail"]), file=sys.stderr, flush=True)
            if args.json:
                write_json(args.json, report)
    print(summary(report), flush=True)
    failed = [r for r in report["results"] if "error" in r]
    if failed:
        print(f"error: {len(failed)} measurement(s) failed", file=sys.stderr)
    return 1 if failed else 0


def available_peers(requested):
    """`(the requested peers that can run, {peer: why not})`: timm's need torch and timm installed."""
    missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
    unavailable = {
        p: f"not installed ({' and '.join(missing)} missing)" for p in requested if missing and p in TIMM_PEERS
    }
    return [p for p in requested if p not in unavailable], unavailable


def versions():
    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "keras", "numpy", "torch", "timm"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def measure(spec, timeout, jax_cache):
    """Run one measurement in a fresh process of this script (its own process group, killed whole on a timeout);
    its result, or `{"error": its last error line}`.

    JAX's persistent compilation cache (`jax_cache`, shared by the run's workers) serves the model-building
    computations (random initializers) compiled by earlier workers; the worker writes nothing to it once the model
    is built, and XLA's autotuning results are not cached, so every measured step compiles from scratch. torch.compile
    gets empty caches of its own for the same reason."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--worker_out", out]
        env = dict(
            os.environ,
            JAX_COMPILATION_CACHE_DIR=jax_cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="none",
            TORCHINDUCTOR_CACHE_DIR=os.path.join(folder, "inductor"),
            TRITON_CACHE_DIR=os.path.join(folder, "triton"),
        )
        begin = time.perf_counter()
        worker = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
        )
        try:
            _, stderr = worker.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)  # torch.compile's compile workers too
            _, stderr = worker.communicate()
            timed_out = True
        worker_s = time.perf_counter() - begin
        lines = [line for line in stderr.splitlines() if line.strip()]
        if timed_out:
            result = {"error": f"timed out after {timeout:.0f} s (--worker_timeout, --budget_s)"}
        elif os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                result = json.load(f)
        else:  # killed, for memory say
            result = {"error": lines[-1] if lines else f"the worker exited with status {worker.returncode}"}
    return result | {"worker_s": worker_s} | ({"stderr_tail": lines[-15:]} if "error" in result else {})


def write_json(path, report):
    """Replace `path` whole, so a run stopped at any time leaves a readable file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(partial, path)


# ----------------------------------------------------------------------------- workers (one per process)


def run_worker(spec, out):
    """Measure `spec` in this process and write its result as JSON; `{"error": ...}` with the traceback on stderr."""
    try:
        result = keras_worker(spec) if spec["peer"] in KERAS_PEERS else timm_worker(spec)
    except Exception as e:
        traceback.print_exc()
        lines = [line for line in str(e).splitlines() if line.strip()]
        result = {"error": f"{type(e).__name__}: {lines[-1] if lines else repr(e)}"}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 1 if "error" in result else 0


def random_batch(batch, resolution):
    """Fixed random float32 RGB images in [0, 1] (NHWC) and integer labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.random((batch, resolution, resolution, 3), dtype=np.float32)
    return images, rng.integers(NUM_CLASSES, size=batch).astype(np.int32)


def timed_steps(step, sync, start, spec):
    """Run `step` (each one waited for by `sync` of its result) `warmup` times, then `steps` timed times: the first
    step's seconds from `start`, and images/s and ms of the median timed step."""
    sync(step())
    first_step_s = time.perf_counter() - start
    for _ in range(spec["warmup"] - 1):
        sync(step())
    seconds = []
    for _ in range(spec["steps"]):
        begin = time.perf_counter()
        sync(step())
        seconds.append(time.perf_counter() - begin)
    median = statistics.median(seconds)
    return {
        "first_step_s": first_step_s,
        "images_per_s": spec["batch"] / median,
        "ms_per_step": median * 1e3,
        "step_ms": [s * 1e3 for s in seconds],
    }


def peak_rss_bytes():
    """This process's peak resident memory: `benchmark.py`'s, in bytes."""
    from benchmark import peak_rss_mb

    return round(peak_rss_mb() * 2**20)


def keras_worker(spec):
    import jax
    import keras

    if spec["dtype"] == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")  # before the model is built
    model = keras_model(spec)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # the measured step: not cached
    images, labels = random_batch(spec["batch"], spec["resolution"])
    images, labels = jax.device_put(images), jax.device_put(labels)
    if spec["task"] == "training":
        result = keras_training(model, images, labels, spec)
    else:
        result = keras_inference(model, images, spec)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory = {"peak_memory_bytes": stats["peak_bytes_in_use"], "peak_memory_of": "accelerator"}
    else:
        memory = {"peak_memory_bytes": peak_rss_bytes(), "peak_memory_of": "process RSS"}
    return {**result, **memory, "params": model.count_params()}


def keras_model(spec):
    """The peer's Keras model of the architecture with NUM_CLASSES classes, randomly initialized."""
    import bit_keras

    if spec["peer"] == "plain_keras":
        return plain_keras_bit(spec["block_units"], spec["width"])
    model = bit_keras.create_model(spec["arch"], num_classes=NUM_CLASSES)
    return model.fold_weight_standardization() if spec["peer"] == "bit_keras_folded" else model


def plain_keras_bit(block_units, width, num_classes=NUM_CLASSES):
    """BiT (ResNet-v2, GroupNorm + weight standardization) as a straightforward Keras 3 user writes it: Keras'
    GroupNormalization, ReLU, and a Conv2D that standardizes its kernel in `convolution_op`."""
    import keras
    from keras import layers, ops

    class StandardizedConv2D(layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
            variance = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
            return super().convolution_op(inputs, (kernel - mean) / ops.sqrt(variance + 1e-10))

    def conv(filters, size, strides=1):
        return StandardizedConv2D(filters, size, strides=strides, use_bias=False)

    def norm_relu(x):
        return layers.ReLU()(layers.GroupNormalization(groups=32, epsilon=1e-5)(x))

    images = keras.Input((None, None, 3))
    x = layers.Rescaling(2.0, offset=-1.0)(images)  # [0, 1] -> [-1, 1]
    root = int(64 * width)
    x = conv(root, 7, 2)(layers.ZeroPadding2D(3)(x))
    x = layers.MaxPooling2D(3, 2)(layers.ZeroPadding2D(1)(x))
    for block, units in enumerate(block_units):
        mid = root * 2**block
        for unit in range(units):
            stride = 2 if unit == 0 and block > 0 else 1
            preact = norm_relu(x)
            shortcut = conv(4 * mid, 1, stride)(preact) if unit == 0 else x
            y = conv(mid, 1)(preact)
            y = conv(mid, 3, stride)(layers.ZeroPadding2D(1)(norm_relu(y)))
            x = layers.Add()([conv(4 * mid, 1)(norm_relu(y)), shortcut])
    x = layers.GlobalAveragePooling2D()(norm_relu(x))
    logits = layers.Dense(num_classes, dtype="float32")(x)  # float32 logits, as bit_keras's head
    return keras.Model(images, logits)


def keras_training(model, images, labels, spec):
    """A jitted stateless training step (buffers donated): value_and_grad of softmax cross-entropy through
    `model.stateless_call`, then SGD momentum's `stateless_apply`; and the convolutions' dtypes in its StableHLO."""
    import jax
    import jax.numpy as jnp
    import keras

    from bit_keras.models.layers import portable_ops

    optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM)
    optimizer.build(model.trainable_variables)

    def loss_fn(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images, training=True)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), non_trainable

    def train_step(state, images, labels):
        trainable, non_trainable, optimizer_variables = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, images, labels
        )
        trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_variables)

    state = tuple(
        [v.value for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables, optimizer.variables)
    )
    start = time.perf_counter()
    with portable_ops() if spec["peer"] == "bit_keras_autodiff" else contextlib.nullcontext():  # at trace time
        lowered = jax.jit(train_step, donate_argnums=0).lower(state, images, labels)
    compiled = lowered.compile()

    def step():
        nonlocal state
        loss, state = compiled(state, images, labels)
        return loss, state

    result = timed_steps(step, jax.block_until_ready, start, spec)
    optimized = compiled.as_text()
    if spec["dump_hlo"]:
        name = f"{spec['peer']}-{spec['dtype']}-{spec['resolution']}px-batch{spec['batch']}.hlo.txt.gz"
        with gzip.open(os.path.join(spec["dump_hlo"], name), "wt", encoding="utf-8") as f:
            f.write(optimized)
    return {**result, **dtype_audit(lowered.as_text()), **compiled_audit(optimized)}


def keras_inference(model, images, spec):
    """A jitted `model.stateless_call(..., training=False)`."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    start = time.perf_counter()
    predict = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
    result = timed_steps(lambda: predict(trainable, non_trainable, images), jax.block_until_ready, start, spec)
    if spec["peer"] == "bit_keras" and spec["dtype"] == "fp32":
        result["float32_precision_deviation"] = float32_precision_deviation(model, images)
    return result


def float32_precision_deviation(model, images):
    """max |logits at JAX's default matmul precision - logits at "highest"| / max |the latter|, with a random head
    (BiT's starts at zero): GPUs run float32 convolutions in TF32 by default."""
    import jax
    import numpy as np

    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(1).normal(0, 0.01, head.kernel.shape).astype(np.float32))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    logits = {}
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(precision):  # a new function each: jit caches traces by function
            predict = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
            logits[precision] = np.asarray(predict(trainable, non_trainable, images), np.float64)
    return float(np.abs(logits["default"] - logits["highest"]).max() / np.abs(logits["highest"]).max())


def dtype_audit(stablehlo):
    """A StableHLO module's convolutions counted by their operands' element types (`{"bf16": n, "f32": m}`; "bf16 x
    f32" for mixed operands), and its converts between bf16 and f32."""
    convolutions = collections.Counter(
        lhs if lhs == rhs else f"{lhs} x {rhs}" for lhs, rhs in CONVOLUTION_TYPES.findall(stablehlo)
    )
    converts = sum({source, target} == {"bf16", "f32"} for source, target in CONVERT_TYPES.findall(stablehlo))
    return {"convolution_dtypes": dict(convolutions), "bf16_f32_converts": converts}


def compiled_audit(hlo):
    """The convolutions XLA compiled (`convolution` on a CPU, cuDNN custom calls on a GPU) counted by their result's
    element type: what runs after XLA's own type and layout passes (a CPU computes bf16 convolutions in f32)."""
    kinds = collections.Counter(
        match.group(1)
        for line in hlo.splitlines()
        if " convolution(" in line or "__cudnn$conv" in line
        if (match := re.search(r"=\s*\(?(\w+)\[", line))
    )
    return {"compiled_convolution_dtypes": dict(kinds)}


def timm_worker(spec):
    import torch
    import torch.nn.functional as F

    device = "cuda" if spec["device"] == "gpu" else "cpu"
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    model = timm_model(spec).to(device, memory_format=torch.channels_last)
    images, labels = random_batch(spec["batch"], spec["resolution"])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(labels).long().to(device)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")

    model.train(spec["task"] == "training")
    start = time.perf_counter()
    network = torch.compile(model) if spec["peer"] == "timm_compile" else model
    if spec["task"] == "training":
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

        def step():
            with autocast():
                loss = F.cross_entropy(network(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    else:

        def step():
            with torch.inference_mode(), autocast():
                network(images)

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    result = timed_steps(step, sync, start, spec)
    if device == "cuda":
        memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_of": "accelerator"}
    else:
        memory = {"peak_memory_bytes": peak_rss_bytes(), "peak_memory_of": "process RSS"}
    return {**result, **memory, "params": sum(p.numel() for p in model.parameters())}


def timm_model(spec):
    """timm's BiT of the architecture, randomly initialized: `benchmark.py`'s, which also makes timm importable
    beside a CPU-only torch."""
    import torch
    from benchmark import timm_model as build  # this script's folder is on sys.path

    return build(argparse.Namespace(arch=spec["arch"], num_classes=NUM_CLASSES), torch)[0]


# ----------------------------------------------------------------------------- report


def header(report, measurements):
    """What is measured, on what, with which versions, and the planned measurements."""
    s, device = report["settings"], report["device"]
    flops = "; ".join(
        f"{r} px: {f / 1e9:.2f} GFLOP forward, {task_flops(f, 'training') / 1e9:.2f} training"
        for r, f in report["forward_flops_per_image"].items()
    )
    lines = [
        f"## GPU benchmark: {s['arch']} on {device['name']} ({device['kind']})",
        "",
        f"- command: `{report['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        f"- FLOPs per image (2 x multiply-adds of the convolutions and the head; training 3 x forward): {flops}",
        f"- median of {s['steps']} timed steps after {s['warmup']} warm-up step(s) (the first one compiles), each "
        f"measurement in a fresh process"
        + (f"; MFU against {s['peak_tflops']:g} TFLOP/s" if device["kind"] == "gpu" else ""),
    ]
    lines += [f"- {PEERS[peer]}: {why}" for peer, why in report["not_installed"].items()]
    lines += ["", f"Planned: {len(measurements)} measurements", ""]
    return "\n".join(lines + [f"{i}. {describe(m)}" for i, m in enumerate(measurements, start=1)] + [""])


def describe(m):
    return f"{PEERS[m['peer']]}, {m['dtype']}, {m['task']}, {m['resolution']} px, batch {m['batch']}"


def progress(result):
    """One measurement's result in a line."""
    if "error" in result:
        return f"failed after {result['worker_s']:.0f} s: {result['error']}"
    if "not_run" in result:
        return f"not run: {result['not_run']}"
    mfu = f", MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""
    return (
        f"{result['images_per_s']:,.0f} images/s, {result['ms_per_step']:.2f} ms/step, first step "
        f"{result['first_step_s']:.1f} s, peak {result['peak_memory_bytes'] / BYTES_PER_GIB:.2f} GiB{mfu} "
        f"(the worker took {result['worker_s']:.0f} s)"
    )


def results_table(results, device):
    columns = ["peer", "precision", "task", "resolution", "batch", "images/s", "ms/step", "first step s"]
    columns.append("peak memory GiB" if device == "gpu" else "peak memory GiB (process RSS)")
    columns += ["MFU %"] if device == "gpu" else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = [PEERS[r["peer"]], r["dtype"], r["task"], str(r["resolution"]), str(r["batch"])]
        if "images_per_s" in r:
            cells += [f"{r['images_per_s']:,.0f}", f"{r['ms_per_step']:.2f}", f"{r['first_step_s']:.1f}"]
            cells += [f"{r['peak_memory_bytes'] / BYTES_PER_GIB:.2f}"]
            cells += [f"{100 * r['mfu']:.1f}"] if device == "gpu" else []
        else:
            cells += ["failed" if "error" in r else "not run"] + ["-"] * (len(columns) - len(cells) - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def find(results, peer, dtype, task, resolution, batch=None):
    """The measured result of that peer and setting, or None."""
    for r in results:
        same = (r["peer"], r["dtype"], r["task"], r["resolution"]) == (peer, dtype, task, resolution)
        if same and "images_per_s" in r and batch in (None, r["batch"]):
            return r
    return None


def ratio_text(ours, theirs):
    return f"{ours['images_per_s'] / theirs['images_per_s']:.2f}" if ours and theirs else "-"


def summary(report):
    """The results table, failures and measurements not run, the ratios, the dtype audit and the issue's targets."""
    results = report["results"]
    lines = ["", "### Results", "", *results_table(results, report["device"]["kind"])]
    notes = [f"- {describe(r)}: failed: {r['error']}" for r in results if "error" in r]
    notes += [f"- {describe(r)}: not run: {r['not_run']}" for r in results if "not_run" in r]
    lines += ["", *notes] if notes else []
    lines += [
        "",
        "### bit_keras / peers (images/s ratios)",
        "",
        "| precision | task | resolution | bit_keras variant | / timm + torch.compile | / timm eager | / plain Keras |",
        "|---|---|---|---|---|---|---|",
    ]
    settings = dict.fromkeys((r["dtype"], r["task"], r["resolution"]) for r in results)
    for dtype, task, resolution in settings:
        compiled, eager, plain = (
            find(results, p, dtype, task, resolution) for p in ("timm_compile", "timm", "plain_keras")
        )
        for peer in ("bit_keras", "bit_keras_folded", "bit_keras_autodiff"):
            ours = find(results, peer, dtype, task, resolution)
            if ours:
                ratios = " | ".join(ratio_text(ours, theirs) for theirs in (compiled, eager, plain))
                lines.append(f"| {dtype} | {task} | {resolution} | {PEERS[peer]} | {ratios} |")
    audited = [r for r in results if r.get("convolution_dtypes") and r["dtype"] == "bf16"]
    if audited:
        lines += [
            "",
            "### bf16 training step: convolutions by operand type (StableHLO of the jitted step), and by result type "
            "once XLA compiled it",
            "",
            "| peer | resolution | convolutions | bf16 | f32 | other | bf16/f32 converts | compiled convolutions |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in audited:
            counts = dict(r["convolution_dtypes"])
            total, bf16, f32 = sum(counts.values()), counts.pop("bf16", 0), counts.pop("f32", 0)
            other = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "0"
            converts = r["bf16_f32_converts"]
            compiled = ", ".join(f"{k}: {v}" for k, v in sorted(r["compiled_convolution_dtypes"].items()))
            lines.append(
                f"| {PEERS[r['peer']]} | {r['resolution']} | {total} | {bf16} | {f32} | {other} | {converts} "
                f"| {compiled} |"
            )
    for r in results:
        if "float32_precision_deviation" in r:
            lines += [
                "",
                f"fp32 logits at JAX's default matmul precision against `jax.default_matmul_precision('highest')` "
                f"({r['resolution']} px): {r['float32_precision_deviation']:.1e} of the largest logit "
                "(GPUs run float32 convolutions in TF32 by default; bit_keras's parity tests hold 1e-5).",
            ]
    return "\n".join(lines + ["", "### The issue's targets (bf16, 224 px)", "", *target_lines(results)])


def target_lines(results):
    lines = []
    for task, batch, floor in TARGETS:
        aim = f"bf16 {task} at batch {batch}: >= {TARGET_RATIO}x timm + torch.compile and >= {floor:,} images/s"
        compiled = find(results, "timm_compile", "bf16", task, 224, batch)
        for peer in ("bit_keras", "bit_keras_folded") if task == "inference" else ("bit_keras",):
            ours = find(results, peer, "bf16", task, 224, batch)
            if ours is None:
                lines.append(f"- {aim}: {PEERS[peer]} not measured")
                continue
            speed = ours["images_per_s"]
            if compiled is None:
                verdict = "timm + torch.compile not measured; " + ("floor met" if speed >= floor else "floor not met")
            else:
                ratio = speed / compiled["images_per_s"]
                met = ratio >= TARGET_RATIO and speed >= floor
                verdict = f"{ratio:.2f}x timm + torch.compile: {'met' if met else 'NOT met'}"
            lines.append(f"- {aim}: {PEERS[peer]} {speed:,.0f} images/s, {verdict}")
    first_steps = [r for r in results if r["peer"] == "bit_keras" and r["task"] == "training" and "first_step_s" in r]
    if not first_steps:
        lines.append(f"- bit_keras's first training step <= {TARGET_FIRST_STEP_S} s: not measured")
    for r in first_steps:
        met = "met" if r["first_step_s"] <= TARGET_FIRST_STEP_S else "NOT met"
        lines.append(
            f"- bit_keras's first training step <= {TARGET_FIRST_STEP_S} s ({r['dtype']}, {r['resolution']} px, "
            f"batch {r['batch']}): {r['first_step_s']:.1f} s, {met}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
