"""The run engine: one training loop for every recipe (fine-tuning, upstream pretraining, detection, distillation).

`RunOptions` holds what every run shares: the data source, the strategy, batch and micro-batches, learning
rate, evaluation interval, resolution, precision, seed, the run folder and verbosity. A `Recipe` supplies what
differs: its checks and data, a `Plan` (the schedule as a `Rule`, the loss, what run.json records, the log lines),
the model and the input pipeline. `train` does the rest the same way for all: the strategy first, every check
before the run folder exists, the model in the strategy's scope, exact resume, `fit` with evaluations and
checkpoints, the log, the final files.
"""

import abc
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol

import keras
import numpy as np
import tensorflow as tf
import tqdm

from bit_keras import options as options_lib
from bit_keras.checks import arg, control_character
from bit_keras.data import sources
from bit_keras.defaults import SPLITS, TEST_FRACTION
from bit_keras.training import logs
from bit_keras.training.run_folder import RunFolder, RunResult, format_score, headline_metric, strict_json
from bit_keras.training.strategy import check_strategy, is_chief, make_strategy
from bit_keras.training.trainer import Objective, Trainer, mixed_precision_policy

log = logging.getLogger(__name__)


class FinishedRun(ValueError):
    """The run folder holds a finished run of this configuration: it is not trained again (`--overwrite` does)."""

    def __init__(self, run: RunFolder, metrics: dict):
        super().__init__(
            f"{run.path} holds a finished run ({run.metrics_path}); choose another {arg('name')} or pass "
            f"{arg('overwrite')}"
        )
        self.run_dir, self.metrics = run.path, metrics


class RunStopped(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where the same command resumes it."""


@options_lib.dataclass("RUN", "CLASSIFICATION_DATA")
class RunOptions:
    """What every training run shares (`bit_keras.options.RUN`, and the image folders and manual downloads that
    classification reads, `CLASSIFICATION_DATA`). A None is the recipe's default; anything given is checked."""

    @property
    def policy(self) -> str | None:
        """The Keras dtype policy name of `mixed_precision` (None: float32)."""
        return mixed_precision_policy(self.mixed_precision)

    def check(self) -> None:
        """One-line errors for bad values, before any folder, download or TensorFlow op (the numbers are checked by
        the declaration, `bit_keras.options`)."""
        options_lib.check_fields(self)
        if self.name is not None and not self.name.strip():
            raise ValueError(f"{arg('name')} must not be empty (leave it out for the default)")
        mixed_precision_policy(self.mixed_precision)
        if not isinstance(self.strategy, tf.distribute.Strategy):
            check_strategy(self.strategy, self.tpu)
        tfds_only = [k for k in ("data_dir", "manual_dir", "train_split", "test_split") if getattr(self, k) is not None]
        if tfds_only and (self.dataset is None or self.dataset in sources.BUNDLED):
            raise ValueError("; ".join(f"{arg(k)} applies to a tfds dataset only" for k in tfds_only))
        if self.test_fraction is not None and self.image_folder is None:
            raise ValueError(f"{arg('test_fraction')} applies to an image folder only")

    def resolved(self) -> dict:
        """The data source's options as the run uses them (the recipe's defaults where not given)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "data"}
        if self.image_folder is not None and self.test_fraction is None:
            values["test_fraction"] = TEST_FRACTION
        if not isinstance(self.strategy, str):
            values["strategy"] = type(self.strategy).__name__
        return values

    def splits(self) -> tuple[str, str]:
        """The tfds training and test splits: the given ones, else `defaults.SPLITS`."""
        given = (self.train_split, self.test_split)
        return tuple(default if split is None else split for split, default in zip(given, SPLITS))

    def eval_interval(self, rule: "Rule") -> int:
        """`eval_every`, or the rule's default."""
        return rule.eval_every if self.eval_every is None else self.eval_every

    def make_strategy(self) -> tf.distribute.Strategy:
        if isinstance(self.strategy, tf.distribute.Strategy):
            return self.strategy
        return make_strategy(self.strategy, self.tpu)

    def load_data(self) -> sources.Data | None:
        """The data source the options name (a `Data` given as is); None when they name none."""
        if self.data is not None:
            return self.data
        if self.dataset is None and self.image_folder is None:
            return None
        return sources.load(
            self.dataset,
            self.image_folder,
            self.data_dir,
            self.manual_dir,
            *self.splits(),
            test_fraction=TEST_FRACTION if self.test_fraction is None else self.test_fraction,
            max_pixels=self.max_pixels,
        )


def from_arguments(cls, arguments: dict, **overrides):
    """A dataclass (`RunOptions` or a recipe) built from the arguments of the function that builds the run: each
    field takes the argument of its name, unless `overrides` gives it."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**({k: v for k, v in arguments.items() if k in names} | overrides))


class Rule(Protocol):
    """A recipe's schedule: `hyperrule.HyperRule` and `upstream.UpstreamRule` are ones."""

    batch: int  # global batch
    steps: int
    momentum: float
    weight_decay: float  # L2 on the kernels
    eval_every: int  # the default evaluation interval

    def learning_rate_schedule(self) -> keras.optimizers.schedules.LearningRateSchedule: ...


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a recipe decides for one run, before its folder exists."""

    name: str  # the run folder's default name
    config: dict  # run.json: what the run trains (a resume must match it exactly)
    rule: Rule
    image_size: int  # the side the evaluation resizes images to (what serving the model needs)
    loss: "str | Callable[[], Objective]" = "softmax"  # Trainer's loss, or a factory of an objective (in scope)
    description: tuple[str, ...] = ()  # lines for the log
    warnings: tuple[str, ...] = ()  # where the recipe's values are far from the data (logged as warnings)
    metrics: dict = dataclasses.field(default_factory=dict)  # the recipe's own metrics.json entries
    resolved: dict = dataclasses.field(default_factory=dict)  # what the recipe chose for options not given


class Recipe(abc.ABC):
    """What one kind of training supplies to the engine: its plan, model and input pipeline."""

    task: str  # the verb, for messages: "finetune", "pretrain"

    def check_source(self, options: RunOptions) -> None:
        """A one-line error for a data source that cannot be loaded, found cheaply (before `check`, which may probe
        the network for the model)."""
        sources.check_source(options.dataset, options.image_folder)

    def check(self, options: RunOptions) -> None:  # noqa: B027 (optional hook)
        """The recipe's own checks of its settings, before any folder, download or TensorFlow op."""

    def load_data(self, options: RunOptions) -> sources.Data:
        data = options.load_data()
        if data is None:
            raise ValueError(
                f"{self.task} needs data: a tfds dataset name ({arg('dataset')}) or an image folder "
                f"({arg('image_folder')})"
            )
        return data

    @abc.abstractmethod
    def plan(self, data: sources.Data, options: RunOptions) -> Plan:
        """The run's plan for `data`."""

    @abc.abstractmethod
    def build_model(self, data: sources.Data, plan: Plan, options: RunOptions) -> keras.Model:
        """The model to train (images in [0, 1] -> logits); called in the strategy's scope."""

    @abc.abstractmethod
    def train_batches(self, data: sources.Data, plan: Plan, options: RunOptions, start_step: int) -> tf.data.Dataset:
        """The training stream from `start_step` on (exactly the batches an uninterrupted run sees there)."""

    @abc.abstractmethod
    def test_batches(self, data: sources.Data, plan: Plan, options: RunOptions) -> tf.data.Dataset:
        """The evaluation batches."""

    @property
    def model_name(self) -> str:
        """The recipe's `model` as the run folder's default name has it (a file's name without .npz or .keras)."""
        return os.path.basename(str(self.model)).removesuffix(".npz").removesuffix(".keras")

    def resolved_splits(self, options: RunOptions) -> dict:
        """The tfds splits the run reads, for run.json's options (none for other data)."""
        if options.dataset is None or options.dataset in sources.BUNDLED:
            return {}
        return dict(zip(("train_split", "test_split"), options.splits()))

    def final_model(self, model: keras.Model) -> keras.Model:
        """The model the run saves and returns, from the one it trained (distillation: the student)."""
        return model

    def evaluate(self, model: keras.Model, data: sources.Data, plan: Plan) -> dict:
        """Scores of `model` beyond the objective's, at every evaluation: `{"test_NAME": value}` (none by default)."""
        return {}

    def save_artifacts(self, run: RunFolder, model: keras.Model, data: sources.Data, plan: Plan) -> None:  # noqa: B027
        """Files of this recipe beside the run folder's own, written at the end by the chief (optional hook)."""


def train(recipe: Recipe, options: RunOptions) -> RunResult:
    """Run `recipe` with `options`: the same sequence for every recipe; returns the finished run."""
    with logs.run_logging(options.verbose) as run_log:  # from the start: data loading logs too
        check(recipe, options)
        strategy = options.make_strategy()  # first: multi-worker collectives must be set up before any op
        data = recipe.load_data(options)
        for split in ("train", "test"):
            if int(getattr(data, split).cardinality()) == 0:
                raise ValueError(f"{data.name}: the {split} split is empty")
        check_class_names(data)
        plan = recipe.plan(data, options)
        config = {**plan.config, "data_fingerprint": data.fingerprint}  # a resume on changed data is refused
        rule, replicas, split = plan.rule, strategy.num_replicas_in_sync, options.batch_split
        if rule.batch % (replicas * split):
            raise ValueError(f"batch {rule.batch} must split evenly over {replicas} replica(s) x batch_split {split}")
        name = plan.name if options.name is None else options.name
        run = RunFolder(os.path.join(options.logdir, name), chief=is_chief(strategy))
        run.refuse_foreign()
        with run.locked(), _stoppable(run):  # one run per folder, for the whole run
            finished = run.prepare(config, options.overwrite)
            if finished is not None:
                raise FinishedRun(run, finished)
            keras.utils.set_random_seed(options.seed)  # the initialization of layers trained from scratch
            with strategy.scope():
                model = recipe.build_model(data, plan, options)
                loss = plan.loss if isinstance(plan.loss, str) else plan.loss()
                trainer = Trainer(model, batch_split=split, loss=loss, weight_decay=rule.weight_decay, name="trainer")
                trainer.compile_sgd(rule.learning_rate_schedule(), rule.momentum, jit_compile=options.xla)
            resolved = resolved_options(options, recipe, plan)
            run.start(config, resolved)
            if run.chief:
                run_log.to_file(run.log_path)
            state = run.restore(trainer)
            for line in plan.description:
                log.info(line)
            log.info("options: " + ", ".join(f"{key}={value!r}" for key, value in resolved.items()))
            for line in plan.warnings:
                log.warning(line)
            frozen = sum(math.prod(w.shape) for w in model.non_trainable_weights)
            strategy_name = type(strategy).__name__.strip("_")
            log.info(
                f"model: {plan.config.get('model', model.name)} ({model.count_params():,} parameters, {frozen:,} of "
                f"them not trained), strategy: {strategy_name} with {replicas} replica(s), batch {rule.batch} "
                f"= {replicas} x {split} x {rule.batch // replicas // split}; run folder {run.path}"
            )
            if state:
                log.info(f"resuming from step {state['step']} ({os.path.join(run.checkpoint_dir, state['weights'])})")
            try:
                state = _fit(run, trainer, recipe, data, plan, options, state, progress=run_log.progress)
            except tf.errors.InvalidArgumentError as err:
                named = data.decode_error(err)
                if named is err:
                    raise
                raise named from err
            objective, last = trainer.objective, state["evals"][-1]
            num_test = int(data.test.cardinality())
            metrics = {
                "name": name,
                **{key: value for key, value in last.items() if key.startswith("test_")},
                "metric": objective.name,
                "evals": state["evals"],
                "steps": rule.steps,
                "wall_s": state["wall_s"],
                "images_per_s": state["trained_images"] / state["train_s"] if state["train_s"] else None,
                "num_test": num_test if num_test >= 0 else None,
                "image_size": plan.image_size,
                "replicas": replicas,
                "batch_split": split,
                "xla": bool(options.xla),
                **{k: v for k, v in plan.config.items() if k != "class_names"},
                **plan.metrics,
            }
            metrics = json.loads(json.dumps(strict_json(metrics)))  # exactly what metrics.json holds
            model = recipe.final_model(model)
            if run.chief:
                recipe.save_artifacts(run, model, data, plan)
                run.finish(model, metrics)
            log.info(result_line(metrics, run.path))
    return RunResult(model, metrics, run.path)


def check(recipe: Recipe, options: RunOptions) -> None:
    """Every check of `recipe` and `options` that needs no data: one-line errors before any folder or download."""
    options.check()
    options_lib.check_fields(recipe)  # its declared options' numbers
    recipe.check_source(options)
    recipe.check(options)


def resolved_options(options: RunOptions, recipe: Recipe, plan: Plan) -> dict:
    """Every option of the run as it runs: given, or what the recipe chose (run.json's "options")."""
    values = options.resolved() | {field.name: getattr(recipe, field.name) for field in dataclasses.fields(recipe)}
    values |= recipe.resolved_splits(options)
    rule = plan.rule
    values |= {
        "batch": rule.batch,
        "base_lr": getattr(rule, "base_lr", options.base_lr),
        "resolution": plan.image_size,
        "eval_every": options.eval_interval(rule),
    }
    if "steps" in values:
        values["steps"] = rule.steps
    return json.loads(json.dumps(strict_json(values | plan.resolved)))


def check_class_names(data: sources.Data) -> None:
    """A one-line error naming the first class name that holds a line break or another control character: class
    names are shown one per line in logs, tables and label files."""
    for name in data.class_names:
        if found := control_character(name):
            raise ValueError(f"{data.name}: class name {name!r} holds the control character {found}; rename it")


def result_line(metrics: dict, run_dir: str) -> str:
    """What a run reports at its end (and when it is run again): its headline test score (COCO AP for detection,
    else accuracy), steps and folder."""
    headline = headline_metric(metrics)
    score = format_score(metrics[headline])  # None if it was not a finite number
    return f"{headline.replace('_', ' ')} {score} after {metrics['steps']} steps; run folder {run_dir}"


@contextlib.contextmanager
def _stoppable(run: RunFolder):
    """Ctrl-C inside the block becomes a `RunStopped` saying where the same command resumes the run."""
    try:
        yield
    except KeyboardInterrupt:
        state = run.state() if run.chief else None
        where = (
            f"resumes it from the checkpoint of step {state['step']}"
            if state
            else "starts it again (no checkpoint was written yet)"
        )
        raise RunStopped(f"stopped (Ctrl-C); the same command {where} in {run.path}") from None


class RunCallback(keras.callbacks.Callback):
    """Evaluates (through `fit`'s validation data), logs, checkpoints and stops a run of `total_steps`.

    At every epoch end (every `eval_every` steps) it appends `{step, test_loss, train_loss, learning_rate}`,
    `test_X` and `train_X` for each of the objective's scores X (classification: accuracy, precision@1 for
    multi-label data) and what `evaluate()` returns (detection: test_ap, ...) to `evals`, adds
    `learning_rate` to the logs (list it before TensorBoard), saves the checkpoint and logs one line:
    `step S/TOTAL: train loss L, X x; test loss L, X x; lr R; N images/s, ETA H:MM:SS` (training throughput since
    the previous evaluation, timed without evaluating; the ETA from that interval's pace, evaluation included).
    """

    def __init__(
        self,
        run: RunFolder,
        total_steps: int,
        batch_size: int,
        state: dict | None = None,
        evaluate: Callable[[], dict] = dict,
    ):
        super().__init__()
        state = state or {}
        self.run = run
        self.evaluate = evaluate
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.evals = list(state.get("evals", []))
        self.wall_s = state.get("wall_s", 0.0)  # of earlier sessions of this run
        self.train_s = state.get("train_s", 0.0)
        self.trained_images = state.get("trained_images", 0)

    def on_train_begin(self, logs=None):
        self._session_start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._epoch_first_step = self._step()
        self._epoch_train_s = None

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        loss = float(np.asarray((logs or {}).get("loss", 0.0)).reshape(-1)[0])  # [1]-shaped on multi-worker
        if not math.isfinite(loss):
            last = self.evals[-1]["step"] if self.evals else None
            kept = f"the checkpoint of step {last} is kept" if last else "no checkpoint was written yet"
            where = f"{kept} in {self.run.checkpoint_dir}"
            raise FloatingPointError(
                f"the training loss became {loss} at step {step}: the run stopped ({where}); lower {arg('base_lr')} or "
                "check the data"
            )
        if step >= self.total_steps:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        if self._epoch_train_s is None:  # fit's validation, not a separate evaluate()
            self._epoch_train_s = time.perf_counter() - self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        step = self._step()
        steps, train_s = step - self._epoch_first_step, self._epoch_train_s or (time.perf_counter() - self._epoch_start)
        self.train_s += train_s
        self.trained_images += steps * self.batch_size
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["learning_rate"] = learning_rate
        objective = self.model.objective
        train, test = objective.scores(logs), objective.scores(logs, prefix="val_")
        extra = self.evaluate()
        entry = {"step": step, "test_loss": float(logs["val_loss"]), **{f"test_{k}": v for k, v in test.items()}}
        entry |= extra | {"train_loss": float(logs["loss"]), **{f"train_{k}": v for k, v in train.items()}}
        entry["learning_rate"] = learning_rate
        self.evals.append(entry)
        train = ", ".join([f"train loss {entry['train_loss']:.4f}"] + [f"{k} {v:.4f}" for k, v in train.items()])
        test = {"loss": entry["test_loss"], **test, **{k.removeprefix("test_"): v for k, v in extra.items()}}
        test = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in test.items())
        pace = f"{steps * self.batch_size / train_s:,.0f} images/s"
        if steps and step < self.total_steps:
            left = round((time.perf_counter() - self._epoch_start) / steps * (self.total_steps - step))
            pace += f", ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
        self.run.save(self.model, self.state(step))  # first: a run stopped after this line resumes from here
        log.info(f"step {step}/{self.total_steps}: {train}; test {test}; lr {learning_rate:.4g}; {pace}")

    def state(self, step: int) -> dict:
        return {
            "step": step,
            "evals": self.evals,
            "wall_s": self.wall_s + time.perf_counter() - self._session_start,
            "train_s": self.train_s,
            "trained_images": self.trained_images,
        }

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())


class ProgressBar(keras.callbacks.Callback):
    """One progress bar over the whole run (steps, rate, ETA, the running train loss and scores), for a terminal;
    log lines go above it (`bit_keras.training.logs`). `close()` it when training ends, however it ends."""

    def __init__(self, total_steps: int, start_step: int):
        super().__init__()
        self.bar = tqdm.tqdm(
            total=total_steps, initial=start_step, unit="step", file=sys.stdout, dynamic_ncols=True, leave=False
        )

    def on_train_batch_end(self, batch, logs=None):
        values = sorted((logs or {}).items(), key=lambda item: item[0] != "loss")  # the loss first
        self.bar.set_postfix_str(", ".join(f"{k} {np.asarray(v).reshape(-1)[0]:.4f}" for k, v in values), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _fit(
    run: RunFolder, trainer: Trainer, recipe: Recipe, data, plan: Plan, options: RunOptions, state, progress: bool
) -> dict:
    """Train to the rule's steps, evaluating and checkpointing every `eval_every` steps, resuming from `state`
    (`RunFolder.restore`), with a `ProgressBar` when `progress`; returns the final state. The output is the log's
    (one line per evaluation), never Keras' progress bar."""
    steps, eval_every = plan.rule.steps, options.eval_interval(plan.rule)
    start_step = state["step"] if state else 0
    if start_step >= steps:
        return state
    callback = RunCallback(run, steps, plan.rule.batch, state, lambda: recipe.evaluate(trainer.model, data, plan))
    callbacks = [callback, keras.callbacks.TensorBoard(run.tensorboard_dir)]
    bar = ProgressBar(steps, start_step) if progress else None
    try:
        trainer.fit(
            recipe.train_batches(data, plan, options, start_step),
            epochs=math.ceil(steps / eval_every),
            initial_epoch=start_step // eval_every,
            steps_per_epoch=eval_every,
            validation_data=recipe.test_batches(data, plan, options),
            shuffle=False,  # the batches come shuffled
            callbacks=callbacks + ([bar] if bar else []),
            verbose=0,
        )
    finally:
        if bar:
            bar.close()
    state = callback.state(steps)
    if state["evals"][-1]["step"] != steps:
        raise RuntimeError(f"training stopped at step {state['evals'][-1]['step']} of {steps}")
    return state
