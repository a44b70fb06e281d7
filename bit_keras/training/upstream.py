"""The upstream (pretraining) recipe of the BiT paper: presets, learning rate and its schedule.

SGD momentum 0.9, lr 0.03 x batch/256 (batch 4096), a linear warmup over 5000 steps at batch 4096
(the same number of examples at other batches), lr /10 at the preset's decay epochs, weight decay 1e-4.
"""

import dataclasses
import math

import keras
from keras import ops

from bit_keras.defaults import UPSTREAM_BASE_LR as BASE_LR  # per 256 examples of batch
from bit_keras.defaults import UPSTREAM_BATCH as BATCH
from bit_keras.defaults import UPSTREAM_PRESETS as PRESETS  # (epochs, decay epochs) of BiT-S, BiT-M, BiT-L
from bit_keras.defaults import UPSTREAM_WEIGHT_DECAY as WEIGHT_DECAY

LR_BATCH = 256
WARMUP_STEPS = 5000  # at BATCH
MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="bit_keras")
class UpstreamSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`peak_lr * step / warmup_steps` during the warmup, then `peak_lr / 10**k` from the k-th boundary on."""

    def __init__(self, peak_lr, warmup_steps, boundaries):
        boundaries = [int(b) for b in boundaries]
        if warmup_steps < 0 or any(b < 1 for b in boundaries) or boundaries != sorted(set(boundaries)):
            raise ValueError(
                f"need warmup_steps >= 0 and increasing positive boundaries, got {warmup_steps}, {boundaries}"
            )
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries

    def __call__(self, step):
        step = ops.cast(step, "float32")
        decays = sum((ops.cast(step >= b, "float32") for b in self.boundaries), ops.zeros((), "float32"))
        decayed = self.peak_lr * ops.power(0.1, decays)
        if not self.warmup_steps:
            return decayed
        return ops.where(step < self.warmup_steps, self.peak_lr * step / self.warmup_steps, decayed)

    def get_config(self):
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "boundaries": list(self.boundaries)}


@dataclasses.dataclass(frozen=True)
class UpstreamRule:
    """One upstream run's settings, in steps."""

    dataset_size: int
    batch: int
    steps_per_epoch: int
    epochs: int
    decay_epochs: tuple
    lr: float  # peak, already scaled to `batch`
    warmup_steps: int
    weight_decay: float
    momentum: float = MOMENTUM

    @property
    def steps(self):
        return self.epochs * self.steps_per_epoch

    @property
    def boundaries(self):
        return [e * self.steps_per_epoch for e in self.decay_epochs]

    @property
    def eval_every(self):
        """The default evaluation interval: an epoch."""
        return self.steps_per_epoch

    def learning_rate_schedule(self):
        return UpstreamSchedule(self.lr, self.warmup_steps, self.boundaries)


def recipe(
    dataset_size: int,
    preset: str = "bit-m",
    batch: int = BATCH,
    base_lr: float = BASE_LR,
    epochs: int | None = None,
    decay_epochs: tuple[int, ...] | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = WEIGHT_DECAY,
) -> UpstreamRule:
    """The `UpstreamRule` of a preset for `dataset_size` examples; every value can be overridden.

    An epoch is `dataset_size // batch` steps (at least one); the warmup defaults to the paper's 5000
    steps of batch 4096 rescaled to `batch` (the same number of examples).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dataset_size < 1 or batch < 1:
        raise ValueError(f"dataset_size and batch must be positive, got {dataset_size} and {batch}")
    preset_epochs, preset_decays = PRESETS[preset]
    epochs = preset_epochs if epochs is None else epochs
    decay_epochs = tuple(preset_decays if decay_epochs is None else decay_epochs)
    if any(not 0 < e < epochs for e in decay_epochs):
        raise ValueError(f"decay epochs {decay_epochs} must lie inside the {epochs} epochs")
    if warmup_steps is None:
        warmup_steps = math.ceil(WARMUP_STEPS * BATCH / batch)
    return UpstreamRule(
        dataset_size=dataset_size,
        batch=batch,
        steps_per_epoch=max(1, dataset_size // batch),
        epochs=epochs,
        decay_epochs=decay_epochs,
        lr=base_lr * batch / LR_BATCH,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
    )
