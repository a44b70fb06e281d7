"""`finetune`: transfer a BiT model to a dataset with the BiT-HyperRule, through `model.fit`."""

import dataclasses
import json
import math
import os

import keras
import tensorflow as tf

from bit_keras import data as data_lib
from bit_keras import hyperrule as hyperrule_lib
from bit_keras import zoo
from bit_keras import run as run_lib
from bit_keras.run import RunFolder, RunResult
from bit_keras.strategy import is_chief, make_strategy
from bit_keras.trainer import Trainer, mixed_precision_policy

# With no data given, `finetune` runs offline on scikit-learn's bundled digits with these settings: the small
# BiT shipped in the package (pretrained on MNIST by `bit-keras pretrain`) at 10x the HyperRule's base lr, which
# is tuned for the paper's large models (measured on the digits: 0.003 -> 89.1%, 0.03 -> 96.0%, 0.1 -> 96.7%).
EMBEDDED = {"model": "BiT-R14x0.5-mnist5k", "batch": 64, "resolution": 32, "steps": 500, "base_lr": 0.03}
DEFAULT_MODEL = "BiT-M-R50x1"  # for the user's own data
TRAINABLE_FROM = ("block1", "block2", "block3", "block4", "head")


def finetune(
    dataset=None,
    *,
    image_folder=None,
    data=None,
    model=None,
    name=None,
    logdir="runs",
    data_dir=None,
    manual_dir=None,
    train_split="train",
    test_split="test",
    examples_per_class=None,
    examples_per_class_seed=0,
    dataset_size=None,
    batch=None,
    batch_split=1,
    base_lr=None,
    steps=None,
    eval_every=None,
    resolution=None,
    mixup_alpha=None,
    bit_pretrained_dir=None,
    cache_dir=None,
    strategy="auto",
    tpu=None,
    mixed_precision=None,
    xla=False,
    freeze_backbone=False,
    trainable_from=None,
    seed=0,
    overwrite=False,
    verbose=1,
):
    """Fine-tune a BiT model with the BiT-HyperRule; returns a `bit_keras.run.RunResult`.

    Data (one of): `dataset`, a tensorflow-datasets name (`data_dir`, `manual_dir` and the split
    names configurable); `image_folder`, one subfolder per class; `data`, a `bit_keras.data.Data`;
    none of them: the embedded digits with the `EMBEDDED` settings for whatever is not given.

    `model` (default BiT-M-R50x1) is a checkpoint name (pretrained weights from `bit_pretrained_dir/NAME.npz` when given,
    else downloaded), an official-layout `.npz` path or URL, or an architecture such as "R50x1"
    (random initialization: training from scratch). The head is always a new zero-initialized one.

    The HyperRule picks the resolution from the images' size, the steps and MixUp from the dataset
    size (`dataset_size` overrides it) and scales `base_lr` (0.003 at batch 512) to `batch`;
    `resolution` (a crop size), `steps` and `mixup_alpha` override it. `batch` is the global batch,
    split over the strategy's replicas and, within each, into `batch_split` micro-batches.
    `strategy` is a name for `bit_keras.strategy.make_strategy` (with `tpu`) or a `tf.distribute.Strategy`
    (create a MultiWorkerMirroredStrategy before any TensorFlow op, e.g. before building `data`).

    The run lives in `logdir/name` (see `bit_keras.run`): evaluations and checkpoints every
    `eval_every` steps (default: a tenth of the run), and an interrupted run resumes exactly from
    its last checkpoint when started again with the same arguments.
    """
    log = print if verbose else (lambda *a, **k: None)
    embedded = data is None and dataset is None and image_folder is None
    if embedded:
        model = model or EMBEDDED["model"]
        batch = batch or EMBEDDED["batch"]
        resolution = resolution or EMBEDDED["resolution"]
        steps = steps or EMBEDDED["steps"]
        base_lr = base_lr or EMBEDDED["base_lr"]
    model = model or DEFAULT_MODEL
    batch = batch or hyperrule_lib.BATCH
    base_lr = base_lr or hyperrule_lib.BASE_LR
    _check_choices(trainable_from, freeze_backbone, mixed_precision, batch, batch_split)
    if not isinstance(strategy, tf.distribute.Strategy):
        strategy = make_strategy(strategy, tpu)  # first: multi-worker collectives must be set up before any op

    # Everything that can fail on the user's input fails here, before the run folder exists.
    _check_unused(
        dataset,
        model,
        data_dir=data_dir,
        manual_dir=manual_dir,
        train_split=train_split != "train",
        test_split=test_split != "test",
        bit_pretrained_dir=bit_pretrained_dir,
    )
    if data is None:
        data = data_lib.load(dataset, image_folder, data_dir, manual_dir, train_split, test_split)
    if examples_per_class:
        data = data_lib.few_shot(data, examples_per_class, seed=examples_per_class_seed)
    size, size_source = (dataset_size, "flag") if dataset_size else (data.num_train, data.size_source)
    rule = hyperrule_lib.hyperrule(
        size, data.image_size, data.name, batch=batch, base_lr=base_lr, resolution_override=resolution, steps=steps
    )
    if mixup_alpha is not None:
        rule = dataclasses.replace(rule, mixup_alpha=mixup_alpha)
    eval_every = eval_every or max(1, math.ceil(rule.steps / 10))
    name = name or f"{data.name}-{os.path.basename(str(model)).removesuffix('.npz')}"
    run_dir = os.path.join(logdir, name)
    replicas = strategy.num_replicas_in_sync
    if batch % (replicas * batch_split):
        raise ValueError(
            f"batch {batch} must split evenly over {replicas} replica(s) x batch_split {batch_split}"
        )
    config = {
        "data": data.name,
        "class_names": data.class_names,
        "num_train": data.num_train,
        "examples_per_class": examples_per_class,
        "examples_per_class_seed": examples_per_class_seed if examples_per_class else None,
        "model": str(model),
        "hyperrule": dataclasses.asdict(rule),
        "eval_every": eval_every,
        "seed": seed,
        "trainable_from": "head" if freeze_backbone else trainable_from,
        "mixed_precision": mixed_precision_policy(mixed_precision),
    }
    run = RunFolder(run_dir, chief=is_chief(strategy))
    run.prepare(config, overwrite)

    keras.utils.set_random_seed(seed)  # the initialization of layers trained from scratch
    with strategy.scope():
        classifier = _build_model(model, data.num_classes, bit_pretrained_dir, cache_dir, config["mixed_precision"])
        frozen = _freeze(classifier, config["trainable_from"])
        trainer = Trainer(classifier, batch_split=batch_split, name="trainer")
        trainer.compile_sgd(rule.learning_rate_schedule(), rule.momentum, jit_compile=xla)
    run.start(config)
    state = run.restore(trainer)

    log(f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training examples ({data.size_source})")
    if size_source == "flag":
        log(f"the HyperRule uses dataset_size={size:,} (given), not the {data.num_train:,} examples found")
    log(rule.describe())
    if rule.batch != hyperrule_lib.BATCH:
        log(f"learning rate scaled by batch/{hyperrule_lib.BATCH}: {rule.base_lr:g} x {batch}/512 = {rule.lr:g}")
    log(
        f"model: {model} ({classifier.count_params():,} parameters, {frozen} frozen layers), "
        f"strategy: {type(strategy).__name__.strip('_')} with {replicas} replica(s), batch {batch} = {replicas} x "
        f"{batch_split} x {batch // replicas // batch_split}; run folder {run_dir}"
    )
    if state:
        log(f"resuming from step {state['step']} ({os.path.join(run.checkpoint_dir, state['weights'])})")

    def batches(start_step):
        return data_lib.train_batches(
            data.train,
            rule.resize,
            rule.crop,
            batch,
            seed=seed,
            start_step=start_step,
            num_classes=data.num_classes,
            mixup_alpha=rule.mixup_alpha,
        )

    test = data_lib.eval_batches(data.test, rule.crop, batch, num_classes=data.num_classes)
    state = run_lib.fit(run, trainer, batches, test, rule.steps, eval_every, batch, state, verbose, data.files)
    final = state["evals"][-1]
    metrics = {
        "name": name,
        "test_accuracy": final["test_accuracy"],
        "evals": state["evals"],
        "steps": rule.steps,
        "wall_s": state["wall_s"],
        "images_per_s": state["trained_images"] / state["train_s"] if state["train_s"] else None,
        "num_train": data.num_train,
        "num_test": int(data.test.cardinality()) if data.test.cardinality() >= 0 else None,
        "dataset_size": size,
        "dataset_size_source": size_source,
        "replicas": replicas,
        "batch_split": batch_split,
        "xla": bool(xla),
        **{k: v for k, v in config.items() if k not in ("class_names", "hyperrule")},
        "hyperrule": config["hyperrule"],
    }
    metrics = json.loads(json.dumps(metrics))  # exactly what metrics.json holds
    if run.chief:
        run.finish(classifier, data.class_names, metrics)
    log(f"test accuracy {metrics['test_accuracy']:.4f} after {rule.steps} steps; run folder {run_dir}")
    return RunResult(classifier, metrics, run_dir)


def _check_choices(trainable_from, freeze_backbone, mixed_precision, batch, batch_split):
    if trainable_from is not None and trainable_from not in TRAINABLE_FROM:
        raise ValueError(f"trainable_from must be one of {TRAINABLE_FROM}, got {trainable_from!r}")
    if freeze_backbone and trainable_from not in (None, "head"):
        raise ValueError(f"freeze_backbone trains only the head; it contradicts trainable_from={trainable_from!r}")
    mixed_precision_policy(mixed_precision)
    if batch < 1 or batch_split < 1:
        raise ValueError(f"batch and batch_split must be positive, got {batch} and {batch_split}")


def _check_unused(dataset, model, **given):
    """Refuse options that would be silently ignored with this data or model."""
    unused = [f"{k} applies to a tfds dataset only" for k in ("data_dir", "manual_dir", "train_split", "test_split")]
    unused = [msg for msg in unused if given[msg.split()[0]] and (dataset is None or dataset in data_lib.BUNDLED)]
    if given["bit_pretrained_dir"] and str(model) not in zoo.CHECKPOINTS:
        unused.append(f"bit_pretrained_dir applies to checkpoint names only, not {model!r}")
    if unused:
        raise ValueError("; ".join(unused))


def _build_model(name, num_classes, bit_pretrained_dir, cache_dir, dtype):
    """The classifier: pretrained (or scratch) backbone and a new zero-initialized head of `num_classes`."""
    name = str(name)
    kwargs = dict(num_classes=num_classes, cache_dir=cache_dir, dtype=dtype)
    if name in zoo.CHECKPOINTS:
        weights = os.path.join(bit_pretrained_dir, f"{name}.npz") if bit_pretrained_dir else "pretrained"
        if bit_pretrained_dir and not os.path.exists(weights):
            raise FileNotFoundError(f"{weights} does not exist (--bit_pretrained_dir holds NAME.npz checkpoints)")
        model = zoo.create_model(name, weights=weights, **kwargs)
    else:
        model = zoo.create_model(name, **kwargs)
    head = model.get_layer("head")
    head.kernel.assign(tf.zeros_like(head.kernel))  # BiT transfers with a zero head, even when the file had one
    head.bias.assign(tf.zeros_like(head.bias))
    return model


def _freeze(model, trainable_from):
    """Freeze every layer before `trainable_from` ("block1".."block4" or "head"); returns how many."""
    if trainable_from is None:
        return 0
    frozen = 0
    for layer in model.layers:
        if layer.name.startswith(trainable_from):
            break
        if layer.weights:
            layer.trainable = False
            frozen += 1
    return frozen
