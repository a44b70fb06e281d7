"""Distillation by function matching (Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", arXiv:2106.05237): the recipe (`DistillRecipe`), its model (`Distiller`), loss (`FunctionMatching`) and
`distill`, which builds and runs it.

Teacher and student see the same aggressively augmented batch (inception crop, flip and MixUp between the batch's
images), computed once per step: the teacher's outputs are never cached from fixed crops. The student minimizes the
KL divergence from the teacher's softmax to its own; the labels only measure accuracy.
"""

import dataclasses
import logging
import os

import keras
import tensorflow as tf

from bit_keras import defaults
from bit_keras import options as options_lib
from bit_keras.checks import arg
from bit_keras.data import pipeline, sources
from bit_keras.models import resolve
from bit_keras.training import engine, logs
from bit_keras.training import hyperrule as hyperrule_lib
from bit_keras.training.finetune import finetune
from bit_keras.training.run_folder import RunFolder, RunResult
from bit_keras.training.trainer import Objective

log = logging.getLogger(__name__)

MOMENTUM = 0.9  # the engine's SGD, as fine-tuning's: the labels-only student it is compared to trains the same way
WARMUP_FRACTION = 20  # default warmup: a twentieth of the steps


@options_lib.verb("distill")
def distill(arguments) -> RunResult:
    """Distill `teacher` into `student` by function matching; returns a `bit_keras.training.run_folder.RunResult`
    whose model is the student (a `BiTImageClassifier` with the teacher's classes).

    `teacher` is anything `bit_keras.finetune`'s `model` takes that has a head for the data's classes (a zoo
    checkpoint, an official `.npz`, a `.keras` file or a finished run folder); `student` an architecture such as
    "R50x1" (random initialization) or a checkpoint, given a new head of the teacher's classes. Data as
    `bit_keras.finetune` (a tfds name, a bundled one, an image folder or a `Data`): the training split's labels are
    not used; the test split's measure the student's and the teacher's accuracy and their top-1 agreement. With no
    data: the embedded digits, the README's main job (`LOGDIR/digits-BiT-R14x0.5-mnist5k`, fine-tuned first when
    missing) as the teacher and an R14x0.5 student, with fine-tuning's embedded batch, lr and steps.

    Both see the same batch: an inception crop (8-100% of the area) resized to `resolution` (default: the teacher's
    input size), a flip, and MixUp with one Beta(`mixup_alpha`, `mixup_alpha`) weight per batch (default 1, the
    paper's); `teacher_input="fixed"` gives the teacher the plain images instead (the paper's fixed teacher, without
    MixUp). The loss is `temperature**2 * KL(softmax(teacher / T) || softmax(student / T))`. SGD with momentum 0.9
    (the paper trains with Adam), `base_lr` at batch 512 scaled to `batch`, a linear warmup of `warmup_steps` then a
    cosine decay to 0 at `steps`, L2 `weight_decay` on the student's kernels. The run folder, resume, strategies and
    micro-batches are the engine's, as for `bit_keras.finetune`.
    """
    embedded = all(arguments[k] is None for k in ("data", "dataset", "image_folder"))
    given = {
        k: arguments[k] if arguments[k] is not None else default
        for k, default in (defaults.DISTILL_EMBEDDED if embedded else defaults.DISTILL_DEFAULTS).items()
    }
    default_teacher = os.path.join(arguments["logdir"], defaults.DISTILL_TEACHER_RUN)
    teacher = arguments["teacher"] if arguments["teacher"] is not None or not embedded else default_teacher
    recipe = engine.from_arguments(
        DistillRecipe,
        arguments,
        embedded=embedded,
        teacher=teacher,
        student=given["student"],
        steps=given["steps"],
        teacher_pending=teacher == default_teacher and not RunFolder(default_teacher).finished(),
    )
    options = engine.from_arguments(
        engine.RunOptions,
        arguments,
        batch=given["batch"],
        base_lr=given["base_lr"],
        resolution=given.get("resolution", arguments["resolution"]),
    )
    if recipe.teacher_pending:
        engine.check(recipe, options)  # bad input stops here, before the teacher's run folder exists
        with logs.run_logging(options.verbose):
            log.info(f"the teacher {teacher} is not there yet: fine-tuning it first (bit-keras finetune)")
        finetune(logdir=options.logdir, strategy=options.strategy, tpu=options.tpu, verbose=options.verbose)
        recipe = dataclasses.replace(recipe, teacher_pending=False)
    return engine.train(recipe, options)


class Distiller(keras.Model):
    """`student` and the frozen `teacher` on the same images: `{"student": logits, "teacher": logits}`; with
    `fixed_teacher=True` it takes `(images, teacher_images)` and the teacher sees the second. Only the student trains;
    a checkpoint needs only its weights (`checkpoint_weights`): the teacher is rebuilt from its source."""

    def __init__(self, student, teacher, image_size, fixed_teacher=False, **kwargs):
        teacher.trainable = False
        images = keras.Input((image_size, image_size, 3), name="images")
        teacher_images = keras.Input((image_size, image_size, 3), name="teacher_images") if fixed_teacher else images
        outputs = {
            "student": student(images),
            "teacher": keras.ops.stop_gradient(teacher(teacher_images, training=False)),
        }
        super().__init__(inputs=(images, teacher_images) if fixed_teacher else images, outputs=outputs, **kwargs)
        self.student, self.teacher = student, teacher

    @property
    def checkpoint_weights(self):
        return self.student.weights


class FunctionMatching(Objective):
    """The KL divergence from the teacher's softmax to the student's at `temperature` T, times T**2 (as big_vision's
    distillation distance "kl"), summed over the examples; metrics: the student's top-1 `accuracy` and the teacher's
    against the targets' argmax, and their top-1 `agreement`."""

    name = "accuracy"

    def __init__(self, temperature=1.0):
        self.temperature = temperature
        self.student_accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
        self.teacher_accuracy = keras.metrics.CategoricalAccuracy(name="teacher_accuracy")
        self.agreement = keras.metrics.Mean(name="agreement")
        self.metrics = [self.student_accuracy, self.teacher_accuracy, self.agreement]

    def loss_sum(self, targets, outputs):
        t = self.temperature
        log_teacher = tf.nn.log_softmax(outputs["teacher"] / t)
        log_student = tf.nn.log_softmax(outputs["student"] / t)
        return t**2 * tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - log_student))

    def update_metrics(self, targets, outputs):
        self.student_accuracy.update_state(targets, outputs["student"])
        self.teacher_accuracy.update_state(targets, outputs["teacher"])
        same = tf.equal(tf.argmax(outputs["student"], -1), tf.argmax(outputs["teacher"], -1))
        self.agreement.update_state(tf.cast(same, tf.float32))


@dataclasses.dataclass(frozen=True)
class DistillRule:
    """The schedule: SGD with momentum at `lr` (`base_lr` at batch 512, scaled), a linear warmup of `warmup_steps`,
    then a cosine decay to 0 at `steps`."""

    batch: int
    steps: int
    base_lr: float
    warmup_steps: int
    weight_decay: float
    momentum: float = MOMENTUM

    @property
    def lr(self) -> float:
        return hyperrule_lib.scaled_lr(self.batch, self.base_lr)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // 10)

    def learning_rate_schedule(self):
        if not self.warmup_steps:
            return keras.optimizers.schedules.CosineDecay(self.lr, self.steps)
        return keras.optimizers.schedules.CosineDecay(
            0.0, self.steps - self.warmup_steps, warmup_target=self.lr, warmup_steps=self.warmup_steps
        )

    def describe(self) -> str:
        return (
            f"{self.steps} steps of batch {self.batch}, lr {self.lr:g} (= {self.base_lr:g} x {self.batch}/"
            f"{hyperrule_lib.BATCH}) after {self.warmup_steps} warmup steps, cosine decay to 0; SGD momentum "
            f"{self.momentum:g}, weight decay {self.weight_decay:g}"
        )


@options_lib.dataclass("PRETRAINED", "DISTILL")
class DistillRecipe(engine.Recipe):
    """Function matching (see `distill`)."""

    task = "distill"

    embedded: bool = False  # no data given: the bundled digits
    teacher_pending: bool = False  # the embedded default teacher is fine-tuned before the run (`distill`)

    def check(self, options: engine.RunOptions) -> None:
        if self.teacher_input not in defaults.TEACHER_INPUTS:
            raise ValueError(
                f"{arg('teacher_input')} must be one of {defaults.TEACHER_INPUTS}, got {self.teacher_input!r}"
            )
        if self.fixed_teacher and self.mixup_alpha:
            raise ValueError(
                f"{arg('teacher_input')} fixed gives the teacher the plain images, which MixUp cannot mix alike; "
                f"pass {arg('mixup_alpha', '0')}"
            )
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"{arg('warmup_steps')} ({self.warmup_steps}) must be below the {self.steps} steps")
        if not self.teacher_pending:
            resolve.check_spec(self.teacher, pretrained_dir=self.bit_pretrained_dir, cache_dir=self.cache_dir)
            if resolve.kind_of(self.teacher) == "architecture":
                raise ValueError(
                    f"the teacher {self.teacher} is an architecture without trained weights; a teacher is a trained "
                    f"classifier ({arg('teacher')})"
                )
        resolve.check_spec(self.student, pretrained_dir=self.bit_pretrained_dir, cache_dir=self.cache_dir)

    @property
    def fixed_teacher(self) -> bool:
        return self.teacher_input == "fixed"

    @property
    def model_name(self) -> str:
        name = lambda spec: os.path.basename(os.path.normpath(str(spec))).removesuffix(".npz").removesuffix(".keras")
        return f"{name(self.student)}-from-{name(self.teacher)}"

    def load_data(self, options: engine.RunOptions) -> sources.Data:
        return sources.embedded_digits() if self.embedded else super().load_data(options)

    def plan(self, data: sources.Data, options: engine.RunOptions) -> engine.Plan:
        teacher = self._teacher()
        if not teacher.model.num_classes:
            raise ValueError(f"the teacher {self.teacher} has no classification head ({arg('teacher')})")
        if teacher.model.num_classes != data.num_classes:
            raise ValueError(
                f"the teacher {self.teacher} has {teacher.model.num_classes} classes, the data {data.name} "
                f"{data.num_classes} ({arg('teacher')})"
            )
        names = teacher.model.class_names
        if names is not None and list(names) != list(data.class_names):
            raise ValueError(
                f"the teacher {self.teacher}'s classes {_shown(names)} are not the data {data.name}'s "
                f"{_shown(data.class_names)} ({arg('teacher')})"
            )
        image_size, why = options.resolution, "given"
        if image_size is None and teacher.image_size is not None:
            image_size, why = teacher.image_size, "the teacher's input size"
        if image_size is None:
            sizes_vary = data.image_size is None and data.median_size is not None
            _, image_size, why = hyperrule_lib.resolution_rule(data.median_size, data.name, None, sizes_vary)
        mixup_alpha = self.mixup_alpha
        if mixup_alpha is None:
            mixup_alpha = 0.0 if self.fixed_teacher else defaults.DISTILL_MIXUP_ALPHA
        warmup = self.warmup_steps if self.warmup_steps is not None else self.steps // WARMUP_FRACTION
        rule = DistillRule(options.batch, self.steps, options.base_lr, warmup, self.weight_decay)
        config = {
            "data": data.name,
            "class_names": data.class_names,
            "num_train": data.num_train,
            "model": str(self.student),
            "teacher": str(self.teacher),
            "teacher_input": self.teacher_input,
            "temperature": self.temperature,
            "mixup_alpha": mixup_alpha,
            "recipe": dataclasses.asdict(rule),
            "resolution": image_size,
            "eval_every": options.eval_interval(rule),
            "seed": options.seed,
            "mixed_precision": options.policy,
        }
        view = "the plain images (fixed teacher)" if self.fixed_teacher else "the student's batch (function matching)"
        description = (
            f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training images (labels unused)",
            f"distilling {self.teacher} into {self.student}: the teacher sees {view}; inception crop {image_size} "
            f"({why}), flip, MixUp alpha {mixup_alpha:g}; KL at temperature {self.temperature:g}",
            rule.describe(),
        )
        return engine.Plan(
            f"{data.name}-{self.model_name}",
            config,
            rule,
            image_size,
            loss=lambda: FunctionMatching(self.temperature),
            description=description,
            resolved={"mixup_alpha": mixup_alpha, "warmup_steps": warmup},
        )

    def build_model(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions) -> keras.Model:
        teacher = self._teacher().model
        teacher.name = "teacher"  # a student of the same checkpoint would have its name
        student = resolve.resolve_model(
            self.student,
            num_classes=data.num_classes,
            new_head=True,
            dtype=options.policy,
            pretrained_dir=self.bit_pretrained_dir,
            cache_dir=self.cache_dir,
        ).model
        student = resolve.with_serving(student, data.class_names, plan.image_size)  # what the saved model carries
        return Distiller(student, teacher, plan.image_size, fixed_teacher=self.fixed_teacher, name="distiller")

    def final_model(self, model: keras.Model) -> keras.Model:
        return model.student

    def train_batches(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions, start_step: int):
        size = plan.image_size
        return pipeline.train_batches(
            data.train,
            size,
            size,
            plan.rule.batch,
            seed=options.seed,
            start_step=start_step,
            num_classes=data.num_classes,
            mixup_alpha=plan.config["mixup_alpha"],
            inception_crop=True,
            plain=self.fixed_teacher,
        )

    def test_batches(self, data: sources.Data, plan: engine.Plan, options: engine.RunOptions):
        batches = pipeline.eval_batches(data.test, plan.image_size, plan.rule.batch, num_classes=data.num_classes)
        return batches.map(lambda images, labels: ((images, images), labels)) if self.fixed_teacher else batches

    def _teacher(self) -> resolve.ResolvedModel:
        return resolve.resolve_model(self.teacher, pretrained_dir=self.bit_pretrained_dir, cache_dir=self.cache_dir)


def _shown(names, limit=4) -> str:
    names = list(names)
    return ", ".join(map(repr, names[:limit])) + (", ..." if len(names) > limit else "")
