"""Upstream pretraining: the paper's recipe (`UpstreamRecipe`, see `bit_keras.training.upstream`) and `pretrain`."""

import dataclasses
import logging
import os

import keras

from bit_keras import options as options_lib
from bit_keras.checks import arg
from bit_keras.data import pipeline, sources
from bit_keras.defaults import PRETRAIN_DEFAULTS
from bit_keras.models import checkpoint, resolve, zoo
from bit_keras.models.layers import NORMALIZATIONS
from bit_keras.training import engine, upstream
from bit_keras.training.run_folder import RunFolder, RunResult
from bit_keras.training.trainer import loss_for_labels

log = logging.getLogger(__name__)


@options_lib.verb("pretrain")
def pretrain(arguments) -> RunResult:
    """Pretrain a BiT architecture from scratch with the paper's upstream recipe; returns a `RunResult`.

    Data as `bit_keras.finetune` (a tfds name, a bundled name, an image folder or a `Data`). Single-label
    data trains with softmax cross-entropy, multi-label data (multi-hot label vectors) with sigmoid
    cross-entropy. Training images get an inception-style random crop (8-100% of the area) resized to
    `resolution` and a random flip; evaluation a central crop after resizing the shorter side to
    `resolution / 0.875`. `schedule` ("bit-s", "bit-m", "bit-l") sets the epochs and decays (`preset`, its earlier
    name, still works and says so); `batch`,
    `base_lr` (per 256 examples), `epochs`, `decay_epochs`, `warmup_steps` and `weight_decay` override.
    `normalization="batch"` / `weight_standardization=False` give the paper's ablation models.
    Besides the run folder of fine-tuning runs, the weights are written as `checkpoint.npz` in the
    official layout, loadable with `bit_keras.create_model("PATH/checkpoint.npz")`.
    """
    preset, schedule = arguments["preset"], arguments["schedule"]
    if preset is not None:  # the earlier name: "preset" is keras-hub's word for a saved model
        if schedule not in (None, preset):
            raise ValueError(f"{arg('preset')} is the earlier name of {arg('schedule')}: give one of them")
        log.warning(f"{arg('preset')} is now called {arg('schedule')} (the same values); {arg('preset')} still works")
        arguments["schedule"] = preset
    given = {k: default if arguments[k] is None else arguments[k] for k, default in PRETRAIN_DEFAULTS.items()}
    decay_epochs = None if arguments["decay_epochs"] is None else tuple(arguments["decay_epochs"])
    recipe = engine.from_arguments(
        UpstreamRecipe,
        arguments,
        model=given["model"],
        schedule=given["schedule"],
        decay_epochs=decay_epochs,
    )
    options = engine.from_arguments(
        engine.RunOptions, arguments, batch=given["batch"], base_lr=given["base_lr"], resolution=given["resolution"]
    )
    return engine.train(recipe, options)


@options_lib.dataclass("MODEL", "PRETRAIN")
class UpstreamRecipe(engine.Recipe):
    """The paper's upstream recipe on a BiT architecture trained from scratch (see `pretrain`)."""

    task = "pretrain"

    def check(self, options: engine.RunOptions) -> None:
        zoo.parse_architecture(self.model)
        if self.schedule not in upstream.PRESETS:
            raise ValueError(f"unknown {arg('schedule')} {self.schedule!r}; choose from {sorted(upstream.PRESETS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"{arg('normalization')} must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    def plan(self, data: sources.Data, options: engine.RunOptions) -> engine.Plan:
        loss = loss_for_labels(data.train.element_spec[1])
        rule = upstream.recipe(
            data.num_train,
            self.schedule,
            options.batch,
            options.base_lr,
            self.epochs,
            self.decay_epochs,
            self.warmup_steps,
            self.weight_decay,
        )
        config = {
            "data": data.name,
            "class_names": data.class_names,
            "num_train": data.num_train,
            "model": self.model,
            "normalization": self.normalization,
            "weight_standardization": self.weight_standardization,
            "loss": loss,
            "recipe": dataclasses.asdict(rule),
            "resolution": options.resolution,
            "eval_every": options.eval_interval(rule),
            "seed": options.seed,
            "mixed_precision": options.policy,
        }
        decays = ", ".join(map(str, rule.decay_epochs))
        description = (
            f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training examples, "
            f"{loss} cross-entropy",
            f"upstream {self.schedule}: {rule.epochs} epochs of {rule.steps_per_epoch} steps ({rule.steps} steps) of "
            f"batch {rule.batch}, lr {rule.lr:g} (= {options.base_lr:g} x {rule.batch}/256) after {rule.warmup_steps} "
            f"warmup steps, /10 at epochs {decays}; weight decay {rule.weight_decay:g} (L2 on kernels); "
            f"SGD momentum {rule.momentum:g}",
        )
        name = f"{data.name}-{self.model}-{self.schedule}"
        resolved = {"epochs": rule.epochs, "decay_epochs": rule.decay_epochs, "warmup_steps": rule.warmup_steps}
        return engine.Plan(name, config, rule, options.resolution, loss, description, resolved=resolved)

    def build_model(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions) -> keras.Model:
        model = zoo.create_model(
            self.model,
            num_classes=data.num_classes,
            normalization=self.normalization,
            weight_standardization=self.weight_standardization,
            dtype=options.policy,
        )
        return resolve.with_serving(model, data.class_names, plan.image_size)  # what the saved model carries

    def train_batches(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions, start_step: int):
        size = options.resolution
        return pipeline.train_batches(
            data.train,
            size,
            size,
            plan.rule.batch,
            seed=options.seed,
            start_step=start_step,
            num_classes=data.num_classes,
            inception_crop=True,
        )

    def test_batches(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions):
        size = options.resolution
        return pipeline.eval_batches(data.test, size, plan.rule.batch, num_classes=data.num_classes, center_crop=True)

    def save_artifacts(self, run: RunFolder, model: keras.Model, data: sources.Data, plan: engine.Plan) -> None:
        checkpoint.save_checkpoint(model, os.path.join(run.path, "checkpoint.npz"))
