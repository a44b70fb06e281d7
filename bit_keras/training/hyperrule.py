"""BiT-HyperRule: the fine-tuning resolution, schedule, MixUp and learning rate of a downstream dataset.

A transcription of the official big_transfer `bit_hyperrule.py`, plus linear learning-rate scaling
for batches other than 512 and a Keras learning-rate schedule.
"""

import dataclasses
import itertools
import math
import numbers

import keras
from keras import ops

from bit_keras.checks import arg

BASE_LR = 0.003  # at BATCH
BATCH = 512
DEFAULTS = {"batch": BATCH, "base_lr": BASE_LR}  # what fine-tuning uses when not told otherwise
MOMENTUM = 0.9
SMALL_AREA = 96 * 96  # images with fewer pixels count as small
SMALL_DATASET = 20_000  # examples
LARGE_DATASET = 500_000

# Nominal (height, width) of datasets whose images the HyperRule knows; keys are TFDS names.
KNOWN_IMAGE_SIZES = {
    "cifar10": (32, 32),
    "cifar100": (32, 32),
    "mnist": (28, 28),
    "fashion_mnist": (28, 28),
    "svhn_cropped": (32, 32),
    "stl10": (96, 96),  # exactly the threshold: large
    "oxford_iiit_pet": (500, 500),  # ~500px photos of varying size; the official table: 224x224, same result
    "oxford_flowers102": (500, 500),  # as above
    "oxford_flower102": (500, 500),  # the official code's spelling
    "imagenet2012": (224, 224),
}


def resolution(image_size=None, dataset=None, override=None):
    """`(resize, crop)` for training: resize to `resize`, random-crop `crop`; evaluate resized to `crop`.

    Images under 96*96 pixels get (160, 128), others (512, 480), as the official code; the paper's
    text says 448/384 for the large case. `image_size` is an int or `(height, width)` (the images' size, or the
    median-area one's when sizes vary) and wins over `dataset`, a key of `KNOWN_IMAGE_SIZES` (a TFDS version suffix
    such as ":3.0.2" is ignored). `override` wins over both: a crop (resized at the same 512/480 ratio) or a
    `(resize, crop)` pair.
    """
    return resolution_rule(image_size, dataset, override)[:2]


def resolution_rule(image_size=None, dataset=None, override=None, sizes_vary=False):
    """`resolution`'s `(resize, crop)` and which rule gave them, and why, in words for the log (`sizes_vary`: the
    images differ in size and `image_size` is the median-area one's)."""
    if override is not None:
        resize, crop = override if isinstance(override, (tuple, list)) else (round(override * 512 / 480), override)
        if not 1 <= crop <= resize:
            raise ValueError(f"resolution override needs 1 <= crop <= resize, got resize={resize} crop={crop}")
        return int(resize), int(crop), f"the resolution given ({arg('resolution')})"
    if image_size is None:
        name = dataset.split(":")[0] if dataset else None
        if name not in KNOWN_IMAGE_SIZES:
            what = f"the image size of {dataset!r} is unknown" if dataset else "no image size or dataset"
            raise ValueError(
                f"BiT-HyperRule resolution: {what}; pass {arg('resolution', 'CROP')} (e.g. 128 for images under "
                f"96x96 pixels, 480 above), or use one of the known datasets {sorted(KNOWN_IMAGE_SIZES)}"
            )
        image_size, whose = KNOWN_IMAGE_SIZES[name], f"{name}'s images (the HyperRule's table)"
    else:
        whose = "the median-area training image" if sizes_vary else "the training images"
    height, width = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    small = height * width < SMALL_AREA
    rule = "the rule for small images, under 96x96 pixels" if small else "the rule for images of 96x96 pixels or more"
    resize, crop = (160, 128) if small else (512, 480)
    return resize, crop, f"{rule}: {whose}: {height}x{width} = {height * width:,} pixels"


def schedule(dataset_size):
    """The steps at which the warmup ends, the learning rate drops by 10 (each inner one) and training stops."""
    _check_size(dataset_size)
    if dataset_size < SMALL_DATASET:
        return [100, 200, 300, 400, 500]
    if dataset_size < LARGE_DATASET:
        return [500, 3000, 6000, 9000, 10000]
    return [500, 6000, 12000, 18000, 20000]


def mixup_alpha(dataset_size):
    """MixUp's Beta(alpha, alpha) parameter: none (0.0) below 20k examples, else 0.1."""
    _check_size(dataset_size)
    return 0.0 if dataset_size < SMALL_DATASET else 0.1


def scaled_lr(batch, base_lr=BASE_LR):
    """`base_lr` (tuned at batch 512) scaled linearly to `batch`."""
    return base_lr * batch / BATCH


def _check_size(dataset_size):
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive number of training examples, got {dataset_size}")


@keras.saving.register_keras_serializable(package="bit_keras")
class HyperRuleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The HyperRule learning rate at optimizer step `step`, as the official `get_lr`.

    `base_lr * step / supports[0]` during the warmup, then `base_lr` divided by 10 for every
    `s in supports[1:]` with `s < step`. The official code stops at `supports[-1]`; past it this
    keeps the last rate.
    """

    def __init__(self, base_lr, supports):
        supports = [int(s) for s in supports]
        if not supports or supports[0] < 1 or any(a >= b for a, b in itertools.pairwise(supports)):
            raise ValueError(f"supports must be positive and strictly increasing, got {supports}")
        self.base_lr = float(base_lr)
        self.supports = supports

    def __call__(self, step):
        step = ops.cast(step, "float32")  # exact for steps below 2**24
        rates = [self.base_lr]
        for _ in self.supports[2:]:
            rates.append(rates[-1] / 10)  # float64 like the official code, rounded once below
        decays = sum((ops.cast(step > s, "int32") for s in self.supports[1:-1]), ops.zeros((), "int32"))
        decayed = ops.take(ops.convert_to_tensor(rates, "float32"), decays)
        warmup = self.base_lr * step / self.supports[0]
        return ops.where(step < self.supports[0], warmup, decayed)

    def get_config(self):
        return {"base_lr": self.base_lr, "supports": list(self.supports)}


@dataclasses.dataclass(frozen=True)
class HyperRule:
    """The HyperRule settings of one fine-tuning run; `lr` is already scaled to `batch`."""

    dataset_size: int
    resize: int
    crop: int
    supports: tuple
    mixup_alpha: float
    batch: int
    lr: float
    momentum: float = MOMENTUM
    base_lr: float = BASE_LR  # the rate at batch 512 that `lr` was scaled from

    weight_decay = 0.0  # BiT fine-tunes without weight decay

    @property
    def steps(self):
        return self.supports[-1]

    @property
    def eval_every(self):
        """The default evaluation interval: a tenth of the run."""
        return max(1, math.ceil(self.steps / 10))

    def learning_rate_schedule(self):
        """A `HyperRuleSchedule` for the optimizer."""
        return HyperRuleSchedule(self.lr, self.supports)

    def describe(self):
        """One paragraph for logs."""
        default = schedule(self.dataset_size)
        steps = f"{self.steps} steps"
        if list(self.supports) != default:
            steps += f" (rescaled from the HyperRule's {default[-1]})"
        decays = ", ".join(str(s) for s in self.supports[1:-1]) or "none"
        lr = f"lr {self.lr:g}"
        if self.batch != BATCH:
            lr += f" (scaled from {self.base_lr:g} at batch {BATCH} to batch {self.batch})"
        mixup = f"MixUp alpha {self.mixup_alpha:g}" if self.mixup_alpha else "no MixUp"
        return (
            f"BiT-HyperRule for {self.dataset_size:,} training examples: train on random {self.crop}px crops "
            f"(with horizontal flips) of images resized to {self.resize}px, evaluate at {self.crop}px; "
            f"{steps} of batch {self.batch} (~{self.steps * self.batch / self.dataset_size:.3g} epochs), "
            f"linear warmup over {self.supports[0]} steps, lr /10 after steps: {decays}; "
            f"SGD momentum {self.momentum:g}, {lr}; {mixup}."
        )


def hyperrule(
    dataset_size: int,
    image_size: int | tuple[int, int] | None = None,
    dataset: str | None = None,
    batch: int = BATCH,
    base_lr: float = BASE_LR,
    resolution_override: int | tuple[int, int] | None = None,
    steps: int | None = None,
) -> HyperRule:
    """The `HyperRule` of a dataset of `dataset_size` training examples (see `resolution` for the sizes).

    `steps` replaces the total number of steps, scaling every support proportionally.
    """
    resize, crop = resolution(image_size, dataset, resolution_override)
    supports = schedule(dataset_size)
    if steps is not None:
        supports = _rescale(supports, steps)
    return HyperRule(
        dataset_size=dataset_size,
        resize=resize,
        crop=crop,
        supports=tuple(supports),
        mixup_alpha=mixup_alpha(dataset_size),
        batch=batch,
        lr=scaled_lr(batch, base_lr),
        base_lr=base_lr,
    )


def _rescale(supports, steps):
    """`supports` scaled to end at `steps`, rounded, kept strictly increasing and >= 1."""
    n = len(supports)
    if steps < n:
        raise ValueError(f"steps={steps}: the schedule needs at least {n} steps")
    scaled, previous = [], 0
    for i, s in enumerate(supports):
        # at least one past the previous, and room left for the remaining supports
        previous = min(max(round(s * steps / supports[-1]), previous + 1), steps - (n - 1 - i))
        scaled.append(previous)
    return scaled
