"""`pretrain`: the BiT upstream recipe (see `bit_keras.upstream`) through `model.fit` under `tf.distribute`."""

import dataclasses
import json
import os

import keras
import tensorflow as tf

from bit_keras import checkpoint
from bit_keras import data as data_lib
from bit_keras import run as run_lib
from bit_keras import upstream, zoo
from bit_keras.model import BiT
from bit_keras.run import RunFolder, RunResult
from bit_keras.strategy import is_chief, make_strategy
from bit_keras.trainer import Trainer, mixed_precision_policy, loss_for_labels


def pretrain(
    dataset=None,
    *,
    image_folder=None,
    data=None,
    model="R50x1",
    name=None,
    logdir="runs",
    data_dir=None,
    manual_dir=None,
    train_split="train",
    test_split="test",
    preset="bit-m",
    batch=upstream.BATCH,
    batch_split=1,
    base_lr=upstream.BASE_LR,
    epochs=None,
    decay_epochs=None,
    warmup_steps=None,
    weight_decay=upstream.WEIGHT_DECAY,
    resolution=224,
    eval_every=None,
    normalization="group",
    weight_standardization=True,
    strategy="auto",
    tpu=None,
    mixed_precision=None,
    xla=False,
    seed=0,
    overwrite=False,
    verbose=1,
):
    """Pretrain a BiT architecture from scratch with the paper's upstream recipe; returns a `bit_keras.run.RunResult`.

    Data as `bit_keras.finetune.finetune` (a tfds name, an image folder or a `Data`). Single-label data
    trains with softmax cross-entropy, multi-label data (multi-hot label vectors) with sigmoid
    cross-entropy. Training images get an inception-style random crop (8-100% of the area) resized to
    `resolution` and a random flip; evaluation a central crop after resizing the shorter side to
    `resolution / 0.875`. `preset` ("bit-s", "bit-m", "bit-l") sets the epochs and decays; `batch`,
    `base_lr` (per 256 examples), `epochs`, `decay_epochs`, `warmup_steps` and `weight_decay` override.
    `normalization="batch"` / `weight_standardization=False` give the paper's ablation models.
    Besides the run folder of fine-tuning runs, the weights are written as `checkpoint.npz` in the
    official layout, loadable with `bit_keras.create_model("PATH/checkpoint.npz")`.
    """
    log = print if verbose else (lambda *a, **k: None)
    policy = mixed_precision_policy(mixed_precision)
    if not isinstance(strategy, tf.distribute.Strategy):
        strategy = make_strategy(strategy, tpu)  # first: multi-worker collectives must be set up before any op
    if data is None:
        if dataset is None and image_folder is None:
            raise ValueError("pretrain needs data: a tfds dataset name or an image folder")
        data = data_lib.load(dataset, image_folder, data_dir, manual_dir, train_split, test_split)
    loss = loss_for_labels(data.train.element_spec[1])
    rule = upstream.recipe(
        data.num_train, preset, batch, base_lr, epochs, decay_epochs, warmup_steps, weight_decay
    )
    replicas = strategy.num_replicas_in_sync
    if batch % (replicas * batch_split):
        raise ValueError(f"batch {batch} must split evenly over {replicas} replica(s) x batch_split {batch_split}")
    eval_every = eval_every or rule.steps_per_epoch
    block_units, width = zoo.parse_architecture(model)
    name = name or f"{data.name}-{model}-{preset}"
    config = {
        "data": data.name,
        "class_names": data.class_names,
        "num_train": data.num_train,
        "model": model,
        "normalization": normalization,
        "weight_standardization": weight_standardization,
        "loss": loss,
        "recipe": dataclasses.asdict(rule),
        "resolution": resolution,
        "eval_every": eval_every,
        "seed": seed,
        "mixed_precision": policy,
    }
    run = RunFolder(os.path.join(logdir, name), chief=is_chief(strategy))
    run.prepare(config, overwrite)

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        network = BiT(
            block_units,
            width,
            num_classes=data.num_classes,
            normalization=normalization,
            weight_standardization=weight_standardization,
            dtype=config["mixed_precision"],
            name=model.lower().replace(".", "_"),
        )
        trainer = Trainer(network, batch_split=batch_split, loss=loss, weight_decay=rule.weight_decay, name="trainer")
        trainer.compile_sgd(rule.learning_rate_schedule(), rule.momentum, jit_compile=xla)
    run.start(config)
    state = run.restore(trainer)
    log(f"data: {data.name}, {data.num_classes} classes, {data.num_train:,} training examples, {loss} cross-entropy")
    log(
        f"upstream {preset}: {rule.epochs} epochs of {rule.steps_per_epoch} steps ({rule.steps} steps) of batch {batch}, "
        f"lr {rule.lr:g} (= {base_lr:g} x {batch}/256) after {rule.warmup_steps} warmup steps, /10 at epochs "
        f"{', '.join(map(str, rule.decay_epochs))}; weight decay {rule.weight_decay:g} (L2 on kernels); "
        f"SGD momentum {rule.momentum:g}; {replicas} replica(s); run folder {run.path}"
    )

    def batches(start_step):
        return data_lib.train_batches(
            data.train, resolution, resolution, batch, seed=seed, start_step=start_step,
            num_classes=data.num_classes, inception_crop=True,
        )

    test = data_lib.eval_batches(data.test, resolution, batch, num_classes=data.num_classes, center_crop=True)
    state = run_lib.fit(run, trainer, batches, test, rule.steps, eval_every, batch, state, verbose, data.files)
    metrics = {
        "name": name,
        "test_accuracy": state["evals"][-1]["test_accuracy"],
        "metric": trainer.accuracy.name,
        "evals": state["evals"],
        "steps": rule.steps,
        "wall_s": state["wall_s"],
        "images_per_s": state["trained_images"] / state["train_s"] if state["train_s"] else None,
        "replicas": replicas,
        "batch_split": batch_split,
        "xla": bool(xla),
        **{k: v for k, v in config.items() if k != "class_names"},
    }
    metrics = json.loads(json.dumps(metrics))
    if run.chief:
        checkpoint.save_checkpoint(network, os.path.join(run.path, "checkpoint.npz"))
        run.finish(network, data.class_names, metrics)
    log(f"test {trainer.accuracy.name} {metrics['test_accuracy']:.4f} after {rule.steps} steps; run folder {run.path}")
    return RunResult(network, metrics, run.path)

