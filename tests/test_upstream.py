"""The upstream recipe: presets, schedule values at their boundaries, weight decay and the label-format loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import bit_keras
from bit_keras.training import upstream
from bit_keras.training.trainer import Trainer, loss_for_labels


def test_bit_m_schedule_at_the_boundaries():
    rule = upstream.recipe(1_281_167, "bit-m")  # ILSVRC-2012 at batch 4096
    assert (rule.steps_per_epoch, rule.steps, rule.warmup_steps) == (312, 28080, 5000)
    assert rule.lr == pytest.approx(0.48) and rule.boundaries == [9360, 18720, 24960]
    lr = rule.learning_rate_schedule()
    expected = {
        0: 0.0,
        2500: 0.24,
        4999: 0.48 * 4999 / 5000,
        5000: 0.48,
        9359: 0.48,
        9360: 0.048,
        18719: 0.048,
        18720: 0.0048,
        24960: 0.00048,
        28079: 0.00048,
    }
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-6), step


def test_bit_l_preset_and_rescaling():
    rule = upstream.recipe(300_000_000, "bit-l", batch=1024)
    assert rule.epochs == 40 and rule.decay_epochs == (10, 23, 30, 37)
    assert rule.lr == pytest.approx(0.12) and rule.warmup_steps == 20_000  # the paper's warmup in examples
    assert rule.boundaries == [e * (300_000_000 // 1024) for e in (10, 23, 30, 37)]
    custom = upstream.recipe(1000, "bit-s", batch=100, epochs=10, decay_epochs=(5,), warmup_steps=0, base_lr=0.1)
    assert (custom.steps, custom.boundaries, custom.lr) == (100, [50], pytest.approx(0.1 * 100 / 256))
    assert float(custom.learning_rate_schedule()(0)) == pytest.approx(custom.lr)  # no warmup


def test_schedule_serializes():
    schedule = upstream.recipe(50_000, "bit-s", batch=256).learning_rate_schedule()
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    for step in (0, 100, 5000 * 16, 10_000_000):
        assert float(again(step)) == float(schedule(step))


def test_recipe_errors():
    with pytest.raises(ValueError, match="unknown preset 'bit-x'"):
        upstream.recipe(100, "bit-x")
    with pytest.raises(ValueError, match="must lie inside the 10 epochs"):
        upstream.recipe(100, epochs=10, decay_epochs=(5, 10))


def _batch(seed=0, classes=10, multi_hot=False):
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.uniform(size=(4, 16, 16, 3)), tf.float32)
    if multi_hot:
        return images, tf.constant(rng.integers(0, 2, size=(4, classes)), tf.float32)
    return images, tf.one_hot(rng.integers(0, classes, 4), classes)


def test_weight_decay_on_exactly_the_kernels(small_npz):
    model = bit_keras.create_model(small_npz)
    plain = Trainer(model)
    decayed = Trainer(model, weight_decay=1e-2)
    kernels = {w.path for w in decayed.decayed}
    assert kernels == {w.path for w in model.weights if w.path.endswith("/kernel")}
    assert model.output_dense.kernel.path in kernels and not any(p.endswith(("gamma", "beta", "bias")) for p in kernels)
    images, targets = _batch()
    l2 = sum(float(np.sum(w.numpy() ** 2)) / 2 for w in decayed.decayed)
    logits = model(images)
    assert float(decayed._loss(targets, logits)) == pytest.approx(
        float(plain._loss(targets, logits)) + 1e-2 * l2, rel=1e-5
    )
    variables = model.trainable_variables
    for trainer in (plain, decayed):
        trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    _, g_plain, _ = plain._loss_and_gradients(images, targets, variables)
    _, g_decayed, _ = decayed._loss_and_gradients(images, targets, variables)
    for v, a, b in zip(variables, g_plain, g_decayed):
        extra = 1e-2 * v.numpy() if v.path in kernels else 0.0  # d/dw of wd * |w|^2 / 2
        np.testing.assert_allclose(b - a, extra, atol=1e-6, err_msg=v.path)


def test_sigmoid_loss_and_precision_at_1(small_npz):
    model = bit_keras.create_model(small_npz)
    trainer = Trainer(model, loss="sigmoid")
    images, targets = _batch(multi_hot=True)
    logits = model(images).numpy()
    expected = np.mean(np.sum(np.maximum(logits, 0) - logits * targets.numpy() + np.log1p(np.exp(-np.abs(logits))), -1))
    assert float(trainer._loss(targets, logits)) == pytest.approx(expected, rel=1e-5)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = trainer.test_step((images, targets))
    hits = targets.numpy()[np.arange(4), np.argmax(logits, -1)]
    assert float(logs["precision_at_1"]) == pytest.approx(hits.mean())


def test_loss_from_the_label_format():
    assert loss_for_labels(tf.TensorSpec([], tf.int64)) == "softmax"
    assert loss_for_labels(tf.TensorSpec([21843], tf.float32)) == "sigmoid"
    with pytest.raises(ValueError, match="class ids \\(scalars\\) or multi-hot vectors"):
        loss_for_labels(tf.TensorSpec([2, 2], tf.float32))
    with pytest.raises(ValueError, match="loss must be one of"):
        Trainer(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]), loss="hinge")
