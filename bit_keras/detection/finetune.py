"""Detection fine-tuning: a RetinaNet on a BiT backbone trained with the paper's recipe on the run engine
(`DetectionRecipe`, `DetectionRule`) and `finetune_detector`, which builds and runs it."""

import dataclasses
import functools
import math
import os

import keras
import tensorflow as tf

from bit_keras import options as options_lib
from bit_keras.checks import arg
from bit_keras.defaults import DETECTION_DEFAULTS as DEFAULTS  # the paper's recipe
from bit_keras.defaults import DETECTION_EMBEDDED as EMBEDDED  # with no data given: the digit canvases, minutes
from bit_keras.detection import data as data_lib
from bit_keras.detection import evaluation, pipeline, retinanet
from bit_keras.detection.objective import FocalLoss
from bit_keras.detection.retinanet import create_detector, paper_label_encoder
from bit_keras.models import resolve
from bit_keras.training import engine
from bit_keras.training.hyperrule import HyperRuleSchedule
from bit_keras.training.run_folder import RunFolder, RunResult

# The paper's COCO recipe (the standard RetinaNet one): 30 epochs of batch 256 at 1024px,
# SGD momentum 0.9, lr 0.08 divided by 10 at epochs 16 and 22, weight decay 1e-4.
EPOCHS, BATCH, BASE_LR, IMAGE_SIZE = (DEFAULTS[k] for k in ("epochs", "batch", "base_lr", "resolution"))
DECAY_EPOCHS, MOMENTUM, WEIGHT_DECAY = (16, 22), 0.9, 1e-4
WARMUP_STEPS = 500  # linear warmup (Detectron's RetinaNet; the paper does not say), at most a tenth of the run
GRID_IMAGES = 8  # test images drawn in detections.png


@dataclasses.dataclass(frozen=True)
class DetectionRule:
    """The paper's schedule scaled to a run: `epochs` over `num_train` images at `batch` (steps), the learning
    rate scaled linearly from `base_lr` at batch 256, the decays at the same fractions of the run."""

    num_train: int
    batch: int
    base_lr: float
    epochs: float
    steps: int
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch / BATCH

    @property
    def supports(self) -> tuple[int, ...]:
        """The steps at which the warmup ends, the rate drops by 10 (twice) and training stops."""
        warmup = max(1, min(WARMUP_STEPS, self.steps // 10))
        first, second = (round(self.steps * epoch / EPOCHS) for epoch in DECAY_EPOCHS)
        first = max(first, warmup + 1)
        second = max(second, first + 1)
        return warmup, first, second, max(self.steps, second + 1)

    @property
    def eval_every(self) -> int:
        """The default evaluation interval: a tenth of the run."""
        return max(1, math.ceil(self.steps / 10))

    def learning_rate_schedule(self):
        return HyperRuleSchedule(self.lr, self.supports)

    def describe(self) -> list[str]:
        warmup, first, second, _ = self.supports
        from_epochs = max(1, round(self.epochs * self.num_train / self.batch))
        steps = f"{self.epochs:g} epochs x {self.num_train:,} images / batch {self.batch} = {from_epochs} steps"
        if from_epochs != self.steps:
            steps = f"{self.steps} steps (given; {steps})"
        return [
            f"RetinaNet recipe: {steps}; lr {self.base_lr:g} x {self.batch}/{BATCH} = {self.lr:g}, linear warmup over "
            f"{warmup} steps, /10 after steps {first} and {second} (epochs {DECAY_EPOCHS[0]} and {DECAY_EPOCHS[1]} "
            f"of {EPOCHS}); SGD momentum {self.momentum:g}, weight decay {self.weight_decay:g}",
        ]


def detection_rule(num_train: int, batch: int, base_lr: float, epochs: float, steps: int | None = None):
    """The `DetectionRule` of a run; `steps` replaces the number of steps `epochs` gives."""
    if steps is None:
        steps = max(1, round(epochs * num_train / batch))
    if steps < 4:
        raise ValueError(f"steps must be at least 4 (warmup, two decays and the end), got {steps}")
    return DetectionRule(num_train, batch, base_lr, epochs, steps)


@options_lib.verb("finetune_detector")
def finetune_detector(arguments) -> RunResult:
    """Fine-tune a RetinaNet on a BiT backbone; returns a `bit_keras.training.run_folder.RunResult`.

    Data (one of): `dataset`, "coco/2017", "voc/2007" or "voc/2012" from tensorflow-datasets (splits default to
    train and validation, or test for VOC 2007, unless named), or "digit-canvases"; `coco_folder`, a local
    COCO-format folder (`bit_keras.detection.data.from_coco_folder`; images over `max_pixels` pixels are refused);
    `data`, a `DetectionData`; none of them:
    the digit canvases with the `EMBEDDED` settings for whatever is not given.

    `model` (the backbone, default BiT-M-R50x1) is anything `bit_keras.detection.retinanet.create_detector`
    takes. The recipe is the paper's (`DEFAULTS`): `epochs` over the training images at `batch` (the global
    batch; `steps` replaces the count), `base_lr` at batch 256 scaled linearly to `batch`, decays at epochs 16
    and 22 of 30, random flips and scale jitter, `resolution` x `resolution` inputs (a multiple of 128).
    `head_norm` adds group normalization to the subnets (paper: no); `freeze_backbone` trains only the pyramid
    and heads.
    Evaluation (every `eval_every` steps, default a tenth of the run): the test loss and COCO AP by pycocotools.
    The run folder, strategies, `batch_split`, mixed precision and exact resume are the engine's (see
    `bit_keras.training.finetune.finetune`); the folder also gets `detections.png`.
    """
    embedded = all(arguments[k] is None for k in ("data", "dataset", "coco_folder"))
    defaults = EMBEDDED if embedded else DEFAULTS
    given = {k: arguments[k] if arguments[k] is not None else v for k, v in defaults.items()}
    recipe_values = {
        k: given[k] for k in ("model", "epochs", "fpn_channels", "head_channels", "head_depth", "head_norm")
    }
    recipe = engine.from_arguments(DetectionRecipe, arguments, **recipe_values)
    options = engine.from_arguments(
        engine.RunOptions, arguments, batch=given["batch"], base_lr=given["base_lr"], resolution=given["resolution"]
    )
    return engine.train(recipe, options)


@options_lib.dataclass("MODEL", "PRETRAINED", "DETECTION")
class DetectionRecipe(engine.Recipe):
    """RetinaNet fine-tuning with the paper's recipe (see `finetune_detector`)."""

    task = "finetune-detector"

    def check_source(self, options: engine.RunOptions) -> None:
        data_lib.check_source(options.dataset, self.coco_folder)

    def check(self, options: engine.RunOptions) -> None:
        if options.dataset is not None and self.coco_folder is not None:
            raise ValueError(
                f"give either a detection dataset ({arg('dataset')}) or a COCO folder ({arg('coco_folder')}), not both"
            )
        if self.steps is not None:
            detection_rule(1, 1, 1.0, 1.0, self.steps)  # the schedule's own checks (steps >= 4), before any download
        retinanet.check_options(
            options.resolution,
            self.fpn_channels,
            self.head_channels,
            self.head_depth,
            self.head_norm,
            flags={"image_size": "resolution"},
        )
        resolve.check_spec(self.model, pretrained_dir=self.bit_pretrained_dir, cache_dir=self.cache_dir)

    def load_data(self, options: engine.RunOptions) -> data_lib.DetectionData:
        if options.data is not None:
            return options.data
        return data_lib.load(
            options.dataset,
            self.coco_folder,
            options.data_dir,
            options.train_split,
            options.test_split,
            options.max_pixels,
        )

    def plan(self, data: data_lib.DetectionData, options: engine.RunOptions) -> engine.Plan:
        rule = detection_rule(data.num_train, options.batch, options.base_lr, self.epochs, self.steps)
        config = {
            "data": data.name,
            "class_names": data.class_names,
            "num_train": data.num_train,
            "model": str(self.model),
            "detector": {
                "resolution": options.resolution,
                "fpn_channels": self.fpn_channels,
                "head_channels": self.head_channels,
                "head_depth": self.head_depth,
                "head_norm": self.head_norm,
                "freeze_backbone": self.freeze_backbone,
            },
            "recipe": {**dataclasses.asdict(rule), "lr": rule.lr, "supports": list(rule.supports)},
            "eval_every": options.eval_interval(rule),
            "seed": options.seed,
            "mixed_precision": options.policy,
        }
        description = [
            f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training images ({data.size_source})",
            *rule.describe(),
            f"RetinaNet: {options.resolution}px inputs, pyramid P3-P7 of {self.fpn_channels} channels, subnets of "
            f"{self.head_depth} x {self.head_channels} channels{' with group norm' if self.head_norm else ''}; "
            f"random flips and scale jitter {pipeline.SCALE_JITTER[0]:g}-{pipeline.SCALE_JITTER[1]:g}",
        ]
        if data.clipped:
            description.append(f"{data.clipped} boxes reached outside their image and were clipped to it")
        return engine.Plan(
            f"{data.name.replace('/', '-')}-retinanet-{self.model_name}",
            config,
            rule,
            image_size=options.resolution,
            loss=FocalLoss,
            description=tuple(description),
        )

    def resolved_splits(self, options: engine.RunOptions) -> dict:
        if options.dataset not in data_lib.TFDS_NAMES:
            return {}
        splits = data_lib.tfds_splits(options.dataset, options.train_split, options.test_split)
        return dict(zip(("train_split", "test_split"), splits))

    def build_model(self, data, plan: engine.Plan, options: engine.RunOptions) -> keras.Model:
        detector = create_detector(
            self.model,
            data.num_classes,
            image_size=options.resolution,
            fpn_channels=self.fpn_channels,
            head_channels=self.head_channels,
            head_depth=self.head_depth,
            head_norm=self.head_norm,
            class_names=data.class_names,  # what the saved model carries
            dtype=options.policy,
            pretrained_dir=self.bit_pretrained_dir,
            cache_dir=self.cache_dir,
        )
        if self.freeze_backbone:
            detector.backbone.image_encoder.trainable = False  # the BiT, not the pyramid
        return detector

    def train_batches(self, data, plan: engine.Plan, options: engine.RunOptions, start_step: int):
        encoder = paper_label_encoder()
        return pipeline.train_batches(
            data.train, encoder, plan.image_size, plan.rule.batch, seed=options.seed, start_step=start_step
        )

    def test_batches(self, data, plan: engine.Plan, options: engine.RunOptions):
        return pipeline.eval_batches(data.test, paper_label_encoder(), plan.image_size, plan.rule.batch)

    def evaluate(self, model, data, plan: engine.Plan) -> dict:
        truth, found = predict_dataset(model, data.test, plan.rule.batch)
        if data.test_truth is not None:  # a COCO folder's annotations as they are, crowd regions and areas included
            truth = data.test_truth
        scores = evaluation.coco_metrics(truth, found, data.num_classes)
        return {f"test_{name}": value for name, value in scores.items()}

    def save_artifacts(self, run: RunFolder, model, data, plan: engine.Plan) -> None:
        from bit_keras.detection import drawing

        truth, found = predict_dataset(model, data.test.take(GRID_IMAGES), GRID_IMAGES, keep_images=True)
        shown = [{k: v[f["scores"] >= drawing.SHOWN_SCORE] for k, v in f.items() if k != "image_id"} for f in found]
        drawing.save_detection_grid(truth, shown, data.class_names, os.path.join(run.path, "detections.png"))


def predict_dataset(model, dataset, batch_size, keep_images=False):
    """Ground truth and detections (the lists `bit_keras.detection.evaluation.coco_metrics` takes) of `model` on
    the unbatched examples of `dataset`; with `keep_images`, the ground-truth entries keep their image (for drawing)."""
    size = model.image_size

    def prepare(example):
        image = tf.image.convert_image_dtype(example["image"], tf.float32)
        kept = example if keep_images else {k: v for k, v in example.items() if k != "image"}
        return {**kept, "input": tf.image.resize(image, (size, size)), "shape": tf.shape(example["image"])[:2]}

    detect = _detector_function(model)
    truth, found = [], []
    batches = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).ragged_batch(batch_size)
    for batch in batches.prefetch(tf.data.AUTOTUNE):
        detections = {k: v.numpy() for k, v in detect(batch["input"]).items()}
        for i, image_id in enumerate(batch["image_id"].numpy()):
            height, width = (int(v) for v in batch["shape"][i])
            entry = {"image_id": int(image_id), "height": height, "width": width}
            entry |= {"boxes": batch["boxes"][i].numpy(), "classes": batch["classes"][i].numpy()}
            if keep_images:
                entry["image"] = batch["image"][i].numpy()
            truth.append(entry)
            n = int(detections["num_detections"][i])
            boxes, scores, classes = (detections[k][i, :n] for k in ("boxes", "confidence", "labels"))
            found.append({"image_id": int(image_id), "boxes": boxes, "scores": scores, "classes": classes})
    return truth, found


@functools.lru_cache(maxsize=2)
def _detector_function(model):
    """`model`'s detections (at COCO's evaluation thresholds) of a batch of resized images, as one graph."""

    @tf.function
    def detect(images):
        return model.decode_predictions(model(images, training=False), images)

    return detect
