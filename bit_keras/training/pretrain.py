"""Upstream pretraining: the paper's recipe (`UpstreamRecipe`, see `bit_keras.training.upstream`) and `pretrain`."""

import dataclasses
import os

import keras
import tensorflow as tf

from bit_keras.data import pipeline, sources
from bit_keras.models import checkpoint, zoo
from bit_keras.models.layers import NORMALIZATIONS
from bit_keras.training import engine, upstream
from bit_keras.training.run_folder import RunFolder, RunResult
from bit_keras.training.trainer import loss_for_labels


def pretrain(
    dataset: str | None = None,
    *,
    image_folder: str | None = None,
    data: sources.Data | None = None,
    model: str = "R50x1",
    name: str | None = None,
    logdir: str = "runs",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    preset: str = "bit-m",
    batch: int = upstream.BATCH,
    batch_split: int = 1,
    base_lr: float = upstream.BASE_LR,
    epochs: int | None = None,
    decay_epochs: list[int] | tuple[int, ...] | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = upstream.WEIGHT_DECAY,
    resolution: int = 224,
    eval_every: int | None = None,
    normalization: str = "group",
    weight_standardization: bool = True,
    strategy: str | tf.distribute.Strategy = "auto",
    tpu: str | None = None,
    mixed_precision: str | None = None,
    xla: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    verbose: int = 1,
) -> RunResult:
    """Pretrain a BiT architecture from scratch with the paper's upstream recipe; returns a `RunResult`.

    Data as `bit_keras.finetune` (a tfds name, a bundled name, an image folder or a `Data`). Single-label
    data trains with softmax cross-entropy, multi-label data (multi-hot label vectors) with sigmoid
    cross-entropy. Training images get an inception-style random crop (8-100% of the area) resized to
    `resolution` and a random flip; evaluation a central crop after resizing the shorter side to
    `resolution / 0.875`. `preset` ("bit-s", "bit-m", "bit-l") sets the epochs and decays; `batch`,
    `base_lr` (per 256 examples), `epochs`, `decay_epochs`, `warmup_steps` and `weight_decay` override.
    `normalization="batch"` / `weight_standardization=False` give the paper's ablation models.
    Besides the run folder of fine-tuning runs, the weights are written as `checkpoint.npz` in the
    official layout, loadable with `bit_keras.create_model("PATH/checkpoint.npz")`.
    """
    recipe = UpstreamRecipe(
        model=model,
        preset=preset,
        epochs=epochs,
        decay_epochs=None if decay_epochs is None else tuple(decay_epochs),
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        normalization=normalization,
        weight_standardization=weight_standardization,
    )
    options = engine.RunOptions(
        dataset=dataset,
        image_folder=image_folder,
        data=data,
        data_dir=data_dir,
        manual_dir=manual_dir,
        train_split=train_split,
        test_split=test_split,
        strategy=strategy,
        tpu=tpu,
        batch=batch,
        batch_split=batch_split,
        base_lr=base_lr,
        eval_every=eval_every,
        resolution=resolution,
        mixed_precision=mixed_precision,
        xla=xla,
        seed=seed,
        logdir=logdir,
        name=name,
        overwrite=overwrite,
        verbose=verbose,
    )
    return engine.train(recipe, options)


@dataclasses.dataclass(frozen=True)
class UpstreamRecipe(engine.Recipe):
    """The paper's upstream recipe on a BiT architecture trained from scratch (see `pretrain`)."""

    model: str = "R50x1"
    preset: str = "bit-m"
    epochs: int | None = None
    decay_epochs: tuple[int, ...] | None = None
    warmup_steps: int | None = None
    weight_decay: float = upstream.WEIGHT_DECAY
    normalization: str = "group"
    weight_standardization: bool = True

    def check(self, options: engine.RunOptions) -> None:
        zoo.parse_architecture(self.model)
        if self.preset not in upstream.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(upstream.PRESETS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    def plan(self, data: sources.Data, options: engine.RunOptions) -> engine.Plan:
        loss = loss_for_labels(data.train.element_spec[1])
        rule = upstream.recipe(
            data.num_train,
            self.preset,
            options.batch,
            options.base_lr,
            self.epochs,
            self.decay_epochs,
            self.warmup_steps,
            self.weight_decay,
        )
        resolution = options.resolution
        eval_every = rule.steps_per_epoch if options.eval_every is None else options.eval_every
        config = {
            "data": data.name,
            "class_names": data.class_names,
            "num_train": data.num_train,
            "model": self.model,
            "normalization": self.normalization,
            "weight_standardization": self.weight_standardization,
            "loss": loss,
            "recipe": dataclasses.asdict(rule),
            "resolution": resolution,
            "eval_every": eval_every,
            "seed": options.seed,
            "mixed_precision": options.policy,
        }
        description = (
            f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training examples, "
            f"{loss} cross-entropy",
            f"upstream {self.preset}: {rule.epochs} epochs of {rule.steps_per_epoch} steps ({rule.steps} steps) of "
            f"batch {rule.batch}, lr {rule.lr:g} (= {options.base_lr:g} x {rule.batch}/256) after {rule.warmup_steps} "
            f"warmup steps, /10 at epochs {', '.join(map(str, rule.decay_epochs))}; "
            f"weight decay {rule.weight_decay:g} (L2 on kernels); SGD momentum {rule.momentum:g}",
        )

        def build_model() -> keras.Model:
            return zoo.create_model(
                self.model,
                num_classes=data.num_classes,
                normalization=self.normalization,
                weight_standardization=self.weight_standardization,
                dtype=options.policy,
            )

        def train_batches(start_step: int) -> tf.data.Dataset:
            return pipeline.train_batches(
                data.train,
                resolution,
                resolution,
                rule.batch,
                seed=options.seed,
                start_step=start_step,
                num_classes=data.num_classes,
                inception_crop=True,
            )

        def test_batches() -> tf.data.Dataset:
            return pipeline.eval_batches(
                data.test, resolution, rule.batch, num_classes=data.num_classes, center_crop=True
            )

        return engine.Plan(
            name=f"{data.name}-{self.model}-{self.preset}",
            config=config,
            batch=rule.batch,
            steps=rule.steps,
            eval_every=eval_every,
            image_size=resolution,
            schedule=rule.learning_rate_schedule(),
            momentum=rule.momentum,
            build_model=build_model,
            train_batches=train_batches,
            test_batches=test_batches,
            loss=loss,
            weight_decay=rule.weight_decay,
            description=description,
        )

    def save_artifacts(self, run: RunFolder, model: keras.Model) -> None:
        checkpoint.save_checkpoint(model, os.path.join(run.path, "checkpoint.npz"))
