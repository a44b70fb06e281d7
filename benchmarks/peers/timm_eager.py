"""timm's BiT (ResNetV2, random init) in eager PyTorch: the model, its inference and training steps, and the
convolutions of a training step alone."""

import contextlib
import functools
import glob
import importlib.util
import os

from benchmarks import harness

# timm's registered BiT models; other architectures are built from its ResNetV2 class with the same arguments.
TIMM_NAMES = {
    "R50x1": "resnetv2_50x1_bit",
    "R50x3": "resnetv2_50x3_bit",
    "R101x1": "resnetv2_101x1_bit",
    "R101x3": "resnetv2_101x3_bit",
    "R152x2": "resnetv2_152x2_bit",
    "R152x4": "resnetv2_152x4_bit",
}
_KEEP_ALIVE = []  # torch.library.Library objects whose definitions must stay


def installed():
    return all(importlib.util.find_spec(m) for m in ("torch", "timm"))


def setup(threads=None):
    """torch seeded, cuDNN left to pick its fastest kernels for the fixed shapes, and its intra- and inter-op
    threads set when `threads` is given."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True


@functools.cache  # the schemas can be declared once a process
def import_timm():
    """timm, which imports torchvision. The registry's torchvision wheel is a CUDA build whose C++ ops do not
    load beside CPU-only torch, and it then fails at import, registering fake kernels for two ops it lacks:
    declare their schemas first (timm's ResNetV2 uses no torchvision op)."""
    import torch

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


def build(arch, num_classes):
    """timm's model of `arch` (random init) and its name."""
    timm = import_timm()
    if arch in TIMM_NAMES:
        return timm.create_model(TIMM_NAMES[arch], num_classes=num_classes), TIMM_NAMES[arch]
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    from bit_keras.models import zoo

    units, width = zoo.parse_architecture(arch)
    model = ResNetV2(  # the arguments of timm's *_bit models
        layers=list(units),
        width_factor=width,
        num_classes=num_classes,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
    )
    return model, f"ResNetV2(layers={list(units)}, width_factor={width})"


def placed(model, images, labels, device, channels_last, training):
    """The model in training or eval mode, the NHWC images as NCHW and the labels, on `device`: in channels-last
    memory format, or contiguous NCHW."""
    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train(training)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(memory_format=memory_format)
    return model, images, torch.from_numpy(labels).long().to(device)


def autocast(device, dtype):
    """`torch.autocast` for a mixed Keras policy (`mixed_bfloat16`, `mixed_float16`); nothing for float32."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, dtype.removeprefix("mixed_")))


def _synchronize(device):
    import torch

    return torch.cuda.synchronize if device == "cuda" else lambda: None


def inference_step(network, images, dtype, device):
    """`network(images)` under `torch.inference_mode()` (and autocast), waited for."""
    import torch

    synchronize = _synchronize(device)

    def step():
        with torch.inference_mode(), autocast(device, dtype):
            network(images)
        synchronize()

    return step


def training_step(model, network, images, labels, dtype, learning_rate, momentum, device):
    """Softmax cross-entropy through `network`, backward, and SGD momentum on `model`'s parameters, waited for;
    float16 with a GradScaler, as Keras' LossScaleOptimizer."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "mixed_float16")
    synchronize = _synchronize(device)

    def step():
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize()

    return step


def convolution_steps(problems):
    """For each `(input shape NHWC, kernel shape HWIO, stride)`: a step of `torch.nn.functional.conv2d` in NCHW (as
    timm runs it), forward and both gradients for a fixed output gradient."""
    import torch

    def problem_step(input_shape, kernel_shape, stride):
        n, h, w, c = input_shape
        kh, kw, cin, cout = kernel_shape
        images = torch.randn(n, c, h, w, requires_grad=True)
        kernel = torch.randn(cout, cin, kh, kw, requires_grad=True)

        def step():
            outputs = torch.nn.functional.conv2d(images, kernel, stride=stride)
            return torch.autograd.grad(outputs, [images, kernel], torch.ones_like(outputs))

        return step

    return [problem_step(*p) for p in problems]


def peak_memory(device):
    """The peak memory of this process: on a GPU the accelerator's, else its resident memory."""
    import torch

    if device == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_of": "accelerator"}
    return harness.rss_memory()


def params(model):
    return sum(p.numel() for p in model.parameters())
