"""Tests for bit_keras.hyperrule against a plain-Python transcription of the official bit_hyperrule.py."""

import dataclasses
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from bit_keras.training import hyperrule as hr

pytestmark = pytest.mark.timeout(60)

SMALL = [100, 200, 300, 400, 500]
MEDIUM = [500, 3000, 6000, 9000, 10000]
LARGE = [500, 6000, 12000, 18000, 20000]


def official_get_schedule(dataset_size):
    if dataset_size < 20_000:
        return [100, 200, 300, 400, 500]
    elif dataset_size < 500_000:
        return [500, 3000, 6000, 9000, 10_000]
    else:
        return [500, 6000, 12_000, 18_000, 20_000]


def official_get_lr(step, dataset_size, base_lr=0.003):
    supports = official_get_schedule(dataset_size)
    if step < supports[0]:
        return base_lr * step / supports[0]
    elif step >= supports[-1]:
        return None
    else:
        for s in supports[1:]:
            if s < step:
                base_lr /= 10
        return base_lr


def boundary_steps(supports):
    s0 = supports[0]
    steps = {0, 1, s0 // 2, s0 - 1, s0, s0 + 1, supports[-1] - 1}
    for s in supports[1:-1]:
        steps |= {s - 1, s, s + 1}
    return sorted(steps)


# --- the rule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, kwargs, resolution, supports, alpha",
    [
        (50_000, {"dataset": "cifar10"}, (160, 128), MEDIUM, 0.1),
        (50_000, {"image_size": (32, 32)}, (160, 128), MEDIUM, 0.1),
        (3_680, {"dataset": "oxford_iiit_pet"}, (512, 480), SMALL, 0.0),
        (1_020, {"dataset": "oxford_flowers102"}, (512, 480), SMALL, 0.0),
        (1_281_167, {"dataset": "imagenet2012"}, (512, 480), LARGE, 0.1),
        (1_281_167, {"image_size": 224}, (512, 480), LARGE, 0.1),
    ],
)
def test_known_datasets(size, kwargs, resolution, supports, alpha):
    rule = hr.hyperrule(size, **kwargs)
    assert (rule.resize, rule.crop) == resolution
    assert rule.supports == tuple(supports) and rule.steps == supports[-1]
    assert rule.mixup_alpha == alpha
    assert (rule.batch, rule.lr, rule.momentum) == (512, 0.003, 0.9)


@pytest.mark.parametrize(
    "size, supports, alpha",
    [(1, SMALL, 0.0), (19_999, SMALL, 0.0), (20_000, MEDIUM, 0.1), (499_999, MEDIUM, 0.1), (500_000, LARGE, 0.1)],
)
def test_dataset_size_boundaries(size, supports, alpha):
    assert hr.schedule(size) == supports == official_get_schedule(size)
    assert hr.mixup_alpha(size) == alpha


def test_bad_dataset_size():
    with pytest.raises(ValueError, match="positive"):
        hr.schedule(0)


@pytest.mark.parametrize(
    "image_size, expected",
    [
        ((96, 96), (512, 480)),
        ((95, 96), (160, 128)),
        ((1, 9215), (160, 128)),
        ((1, 9216), (512, 480)),
        (28, (160, 128)),
    ],
)
def test_resolution_area_threshold(image_size, expected):
    assert hr.resolution(image_size) == expected


def test_resolution_precedence_and_names():
    assert hr.resolution((32, 32), dataset="imagenet2012") == (160, 128)  # image_size wins
    assert hr.resolution(dataset="cifar100:3.0.2") == (160, 128)  # TFDS version ignored
    assert hr.resolution(dataset="oxford_flower102") == (512, 480)  # the official spelling
    assert hr.resolution(dataset="mnist") == hr.resolution(dataset="svhn_cropped") == (160, 128)


@pytest.mark.parametrize(
    "override, expected",
    [(480, (512, 480)), (384, (410, 384)), (128, (137, 128)), ((448, 384), (448, 384)), ([160, 160], (160, 160))],
)
def test_resolution_override(override, expected):
    assert hr.resolution((32, 32), dataset="cifar10", override=override) == expected
    rule = hr.hyperrule(50_000, dataset="cifar10", resolution_override=override)
    assert (rule.resize, rule.crop) == expected


def test_resolution_errors():
    with pytest.raises(ValueError, match="no image size or dataset; pass resolution=CROP"):
        hr.resolution()
    with pytest.raises(ValueError, match="image size of .my_data. is unknown; pass resolution=CROP.*cifar10"):
        hr.hyperrule(1000, dataset="my_data")
    with pytest.raises(ValueError, match="crop <= resize"):
        hr.resolution(override=(100, 200))


def test_lr_scaling():
    assert hr.scaled_lr(512) == 0.003
    assert hr.scaled_lr(128) == pytest.approx(0.003 * 128 / 512)
    assert hr.scaled_lr(1024, base_lr=0.01) == pytest.approx(0.02)
    rule = hr.hyperrule(50_000, dataset="cifar10", batch=128)
    assert rule.lr == pytest.approx(0.00075) and rule.base_lr == 0.003 and rule.batch == 128
    text = rule.describe()
    assert "scaled from 0.003 at batch 512 to batch 128" in text and "lr 0.00075" in text


def test_describe():
    text = hr.hyperrule(50_000, dataset="cifar10").describe()
    for part in (
        "50,000 training examples",
        "128px crops",
        "resized to 160px",
        "10000 steps of batch 512",
        "warmup over 500 steps",
        "3000, 6000, 9000",
        "momentum 0.9",
        "lr 0.003;",
        "MixUp alpha 0.1",
    ):
        assert part in text, (part, text)
    assert "scaled" not in text and "rescaled" not in text
    small = hr.hyperrule(3_680, dataset="oxford_iiit_pet", steps=1000).describe()
    assert "no MixUp" in small and "1000 steps (rescaled from the HyperRule's 500)" in small


def test_rule_is_frozen():
    rule = hr.hyperrule(50_000, dataset="cifar10")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.lr = 1.0


@pytest.mark.parametrize(
    "size, steps, expected",
    [
        (50_000, 1000, (50, 300, 600, 900, 1000)),
        (50_000, 20_000, (1000, 6000, 12000, 18000, 20000)),
        (1000, 7, (1, 3, 4, 6, 7)),
        (1000, 5, (1, 2, 3, 4, 5)),
        (1_281_167, 6, (1, 2, 4, 5, 6)),
    ],
)
def test_steps_override(size, steps, expected):
    assert hr.hyperrule(size, image_size=32, steps=steps).supports == expected


@pytest.mark.parametrize("size", [1000, 50_000, 1_000_000])
def test_steps_override_stays_valid(size):
    for steps in range(5, 3000, 7):
        supports = hr.hyperrule(size, image_size=32, steps=steps).supports
        assert supports[0] >= 1 and supports[-1] == steps
        assert all(a < b for a, b in itertools.pairwise(supports)), (steps, supports)


def test_steps_override_too_short():
    with pytest.raises(ValueError, match="at least 5 steps"):
        hr.hyperrule(1000, image_size=32, steps=4)


# --- the learning-rate schedule -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 50_000, 1_281_167])
def test_schedule_matches_official(size):
    supports = official_get_schedule(size)
    schedule = hr.HyperRuleSchedule(0.003, supports)
    for step in boundary_steps(supports):
        expected = official_get_lr(step, size)
        for value in (step, tf.constant(step, tf.int64), tf.constant(step, tf.int32), tf.constant(step, tf.float32)):
            assert float(schedule(value)) == pytest.approx(expected, rel=1e-6, abs=1e-12), (step, value)
    final = official_get_lr(supports[-1] - 1, size)
    assert official_get_lr(supports[-1], size) is None  # the official code stops here; we keep the last rate
    for step in (supports[-1], supports[-1] + 1, 10 * supports[-1]):
        assert float(schedule(step)) == pytest.approx(final, rel=1e-6)


def test_schedule_values():
    schedule = hr.HyperRuleSchedule(0.003, SMALL)
    expected = {
        0: 0.0,
        50: 0.0015,
        99: 0.00297,
        100: 0.003,
        200: 0.003,
        201: 3e-4,
        300: 3e-4,
        301: 3e-5,
        400: 3e-5,
        401: 3e-6,
        499: 3e-6,
        500: 3e-6,
        20_000: 3e-6,
    }
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=0), step
    assert schedule(tf.constant(7, tf.int64)).dtype == tf.float32


def test_schedule_in_tf_function():
    schedule = hr.HyperRuleSchedule(0.003, MEDIUM)
    step = tf.Variable(0, dtype=tf.int64)
    lr = tf.function(lambda: schedule(step))
    for value in (0, 250, 500, 3000, 3001, 9999, 10_000):
        step.assign(value)
        assert float(lr()) == pytest.approx(official_get_lr(min(value, 9999), 50_000), rel=1e-6, abs=1e-12)
    assert lr.experimental_get_tracing_count() == 1


def test_schedule_in_sgd():
    schedule = hr.HyperRuleSchedule(0.003, MEDIUM)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    for value in (0, 300, 500, 3000, 3001, 6001):
        optimizer.iterations.assign(value)
        assert float(optimizer.learning_rate) == pytest.approx(official_get_lr(value, 50_000), rel=1e-6, abs=1e-12)
    # the update of the step itself uses the schedule's rate: first momentum step is -lr * grad
    variable = keras.Variable(np.ones(3, np.float32))
    optimizer.build([variable])
    optimizer.iterations.assign(300)
    optimizer.apply_gradients([(tf.constant([1.0, 2.0, -1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), 1 - 0.0018 * np.array([1.0, 2.0, -1.0]), rtol=1e-6)
    assert int(optimizer.iterations) == 301


def test_schedule_config_round_trip():
    schedule = hr.HyperRuleSchedule(0.00075, MEDIUM)
    assert schedule.get_config() == {"base_lr": 0.00075, "supports": MEDIUM}
    clone = hr.HyperRuleSchedule.from_config(schedule.get_config())
    serialized = keras.saving.serialize_keras_object(schedule)
    assert serialized["registered_name"] == "bit_keras>HyperRuleSchedule"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, hr.HyperRuleSchedule)
    optimizer = keras.optimizers.SGD.from_config(keras.optimizers.SGD(schedule, momentum=0.9).get_config())
    for step in boundary_steps(MEDIUM):
        value = float(schedule(step))
        assert float(clone(step)) == float(restored(step)) == value
        optimizer.iterations.assign(step)
        assert float(optimizer.learning_rate) == value


def test_rule_schedule():
    schedule = hr.hyperrule(50_000, dataset="cifar10", batch=128, steps=1000).learning_rate_schedule()
    assert schedule.get_config() == {"base_lr": pytest.approx(0.00075), "supports": [50, 300, 600, 900, 1000]}


@pytest.mark.parametrize("supports", [[], [0, 10], [10, 10, 20], [10, 5]])
def test_schedule_rejects_bad_supports(supports):
    with pytest.raises(ValueError, match="strictly increasing"):
        hr.HyperRuleSchedule(0.003, supports)
