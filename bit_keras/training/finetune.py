"""Fine-tuning with the BiT-HyperRule: the recipe (`HyperRuleRecipe`) and `finetune`, which builds and runs it."""

import dataclasses

import keras

from bit_keras import options as options_lib
from bit_keras.checks import arg
from bit_keras.data import pipeline, sources
from bit_keras.defaults import FINETUNE_EMBEDDED as EMBEDDED  # with no data given: the bundled digits, offline
from bit_keras.defaults import TRAINABLE_FROM
from bit_keras.models import resolve
from bit_keras.training import engine
from bit_keras.training import hyperrule as hyperrule_lib
from bit_keras.training.run_folder import RunResult

DEFAULT_MODEL = "BiT-M-R50x1"  # for the user's own data
UPSAMPLING_WARNING = 4  # crops this many times the images' side are worth a warning


@options_lib.verb("finetune")
def finetune(arguments) -> RunResult:
    """Fine-tune a BiT model with the BiT-HyperRule; returns a `bit_keras.training.run_folder.RunResult`.

    Data (one of): `dataset`, a tensorflow-datasets name (`data_dir`, `manual_dir` and the split
    names configurable) or a bundled one ("digits", "mnist5k"); `image_folder`, one subfolder per class
    (without `train/` and `test/` subfolders, a stratified `test_fraction` of each class is held out for
    testing; files over `max_pixels` pixels are refused); `data`, a `bit_keras.data.sources.Data`; none of
    them: the embedded digits with the `EMBEDDED` settings for whatever is not given.

    `model` (default BiT-M-R50x1) is anything `bit_keras.models.resolve.resolve_model` accepts: a checkpoint
    name (pretrained weights from `bit_pretrained_dir/NAME.npz` when given, else downloaded), an official-layout
    `.npz` path or URL, an architecture such as "R50x1" (random initialization: training from scratch), or a
    `.keras` file or finished run folder. The head is always a new zero-initialized one.

    The HyperRule picks the resolution from the images' size, the steps and MixUp from the dataset
    size (`dataset_size` overrides it) and scales `base_lr` (0.003 at batch 512) to `batch`;
    `resolution` (a crop size), `steps` and `mixup_alpha` override it. `batch` is the global batch,
    split over the strategy's replicas and, within each, into `batch_split` micro-batches.
    `strategy` is a name for `bit_keras.training.strategy.make_strategy` (with `tpu`) or a
    `tf.distribute.Strategy` (create a MultiWorkerMirroredStrategy before any TensorFlow op).

    The run lives in `logdir/name` (see `bit_keras.training.run_folder`): evaluations and checkpoints every
    `eval_every` steps (default: a tenth of the run), and an interrupted run resumes exactly from
    its last checkpoint when started again with the same arguments.
    """
    embedded = all(arguments[k] is None for k in ("data", "dataset", "image_folder"))
    # What is not given comes from the embedded settings when no data is given, else from the HyperRule.
    defaults = EMBEDDED if embedded else {"model": DEFAULT_MODEL, **hyperrule_lib.DEFAULTS}
    given = {k: arguments[k] if arguments[k] is not None else defaults.get(k) for k in EMBEDDED}
    recipe = engine.from_arguments(
        HyperRuleRecipe, arguments, embedded=embedded, model=given["model"], steps=given["steps"]
    )
    options = engine.from_arguments(
        engine.RunOptions, arguments, batch=given["batch"], base_lr=given["base_lr"], resolution=given["resolution"]
    )
    return engine.train(recipe, options)


@options_lib.dataclass("MODEL", "PRETRAINED", "FINETUNE")
class HyperRuleRecipe(engine.Recipe):
    """BiT's downstream recipe: a new zero head, the HyperRule's resolution, schedule and MixUp, softmax
    cross-entropy, SGD momentum without weight decay, random crops and flips (see `finetune`)."""

    task = "finetune"

    embedded: bool = False  # no data given: the bundled digits

    def check(self, options: engine.RunOptions) -> None:
        if self.trainable_from is not None and self.trainable_from not in TRAINABLE_FROM:
            raise ValueError(f"{arg('trainable_from')} must be one of {TRAINABLE_FROM}, got {self.trainable_from!r}")
        if self.freeze_backbone and self.trainable_from not in (None, "head"):
            raise ValueError(
                f"{arg('freeze_backbone')} trains only the head; it contradicts "
                f"{arg('trainable_from', repr(self.trainable_from))}"
            )
        hyperrule_lib.hyperrule(1, image_size=1, steps=self.steps)  # the schedule's own checks, before any download
        resolve.check_spec(self.model, pretrained_dir=self.bit_pretrained_dir, cache_dir=self.cache_dir)

    def load_data(self, options: engine.RunOptions) -> sources.Data:
        data = sources.embedded_digits() if self.embedded else super().load_data(options)
        if self.examples_per_class:
            data = sources.few_shot(data, self.examples_per_class, seed=self.examples_per_class_seed)
        return data

    def plan(self, data: sources.Data, options: engine.RunOptions) -> engine.Plan:
        given_size = self.dataset_size is not None
        size, size_source = (self.dataset_size, "flag") if given_size else (data.num_train, data.size_source)
        rule = hyperrule_lib.hyperrule(
            size,
            data.median_size,
            data.name,
            batch=options.batch,
            base_lr=options.base_lr,
            resolution_override=options.resolution,
            steps=self.steps,
        )
        sizes_vary = data.image_size is None and data.median_size is not None
        why = hyperrule_lib.resolution_rule(data.median_size, data.name, options.resolution, sizes_vary)[2]
        if self.mixup_alpha is not None:
            rule = dataclasses.replace(rule, mixup_alpha=self.mixup_alpha)
        warnings = []
        if rule.batch > data.num_train:  # a batch of more images than exist would repeat them within the batch
            batch = max(options.batch_split, data.num_train // options.batch_split * options.batch_split)
            warnings.append(
                f"batch {rule.batch} is larger than the {data.num_train:,} training examples: clamped to {batch} "
                f"(lr scaled to it); the schedule's {rule.steps} steps are "
                f"~{rule.steps * batch / data.num_train:,.0f} epochs"
            )
            rule = dataclasses.replace(rule, batch=batch, lr=hyperrule_lib.scaled_lr(batch, rule.base_lr))
        if data.median_size and rule.crop >= UPSAMPLING_WARNING * min(data.median_size):
            height, width = data.median_size
            warnings.append(
                f"the {rule.crop}px crops upsample the {height}x{width} images {rule.crop / min(height, width):.0f}x "
                f"(the HyperRule's size for small images); {arg('resolution')} sets a smaller one"
            )
        config = {
            "data": data.name,
            "class_names": data.class_names,
            "num_train": data.num_train,
            "examples_per_class": self.examples_per_class,
            "examples_per_class_seed": self.examples_per_class_seed if self.examples_per_class else None,
            "model": str(self.model),
            "hyperrule": dataclasses.asdict(rule),
            "eval_every": options.eval_interval(rule),
            "seed": options.seed,
            "trainable_from": self.trainable_layers,
            "mixed_precision": options.policy,
        }
        description = [
            f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training examples ({data.size_source})"
        ]
        if given_size:
            description.append(
                f"the HyperRule uses dataset_size={size:,} (given), not the {data.num_train:,} examples found"
            )
        description.append(f"BiT-HyperRule resolution: resize {rule.resize}, crop {rule.crop}, by {why}")
        description.append(rule.describe())
        if rule.batch != hyperrule_lib.BATCH:
            description.append(
                f"learning rate scaled by batch/{hyperrule_lib.BATCH}: "
                f"{rule.base_lr:g} x {rule.batch}/{hyperrule_lib.BATCH} = {rule.lr:g}"
            )
        return engine.Plan(
            f"{data.name}-{self.model_name}",
            config,
            rule,
            image_size=rule.crop,
            description=tuple(description),
            warnings=tuple(warnings),
            metrics={"dataset_size": size, "dataset_size_source": size_source},
            resolved={"dataset_size": size, "mixup_alpha": rule.mixup_alpha},
        )

    @property
    def trainable_layers(self) -> str | None:
        """The first layer that trains (None: all)."""
        return "head" if self.freeze_backbone else self.trainable_from

    def build_model(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions) -> keras.Model:
        classifier = resolve.resolve_model(
            self.model,
            num_classes=data.num_classes,
            new_head=True,  # BiT transfers with a zero head, even when the file had one of the right size
            dtype=options.policy,
            pretrained_dir=self.bit_pretrained_dir,
            cache_dir=self.cache_dir,
        ).model
        _freeze(classifier, self.trainable_layers)
        return resolve.with_serving(classifier, data.class_names, plan.image_size)  # what the saved model carries

    def train_batches(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions, start_step: int):
        rule = plan.rule
        return pipeline.train_batches(
            data.train,
            rule.resize,
            rule.crop,
            rule.batch,
            seed=options.seed,
            start_step=start_step,
            num_classes=data.num_classes,
            mixup_alpha=rule.mixup_alpha,
        )

    def test_batches(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions):
        return pipeline.eval_batches(data.test, plan.rule.crop, plan.rule.batch, num_classes=data.num_classes)


def _freeze(model: keras.Model, trainable_from: str | None) -> None:
    """Freeze every layer of the backbone before `trainable_from` ("block1".."block4"), or all of it ("head")."""
    if trainable_from is None:
        return
    for layer in model.backbone.layers:
        if layer.name.startswith(trainable_from):
            break
        if layer.weights:
            layer.trainable = False
