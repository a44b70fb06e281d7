"""Tests for bit_keras.mixup: one lambda per batch for images and labels, the reverse partner, Beta sampling."""

import numpy as np
import pytest
import tensorflow as tf

from bit_keras.data.mixup import mixup, sample_beta

pytestmark = pytest.mark.timeout(60)

BATCH = 6


@pytest.fixture
def batch():
    images = np.random.default_rng(0).normal(size=(BATCH, 5, 4, 3)).astype(np.float32)
    labels = np.eye(BATCH, dtype=np.float32)  # example i is class i, so lambda shows in the labels
    return images, labels


def check_mixed(images, labels, mixed_images, mixed_labels):
    """Recover lambda from the labels and check both tensors are the batch mixed with its reverse by it."""
    mixed_images, mixed_labels = np.asarray(mixed_images), np.asarray(mixed_labels)
    lam = mixed_labels[0] @ labels[0]  # labels[0] is one-hot, and differs from its partner labels[-1]
    np.testing.assert_allclose(mixed_labels, lam * labels + (1 - lam) * labels[::-1], atol=1e-6)
    np.testing.assert_allclose(mixed_images, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    return lam


def ks_statistic(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return np.max(np.abs(cdf(a) - cdf(b)))


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_same_lambda_and_reverse(batch, alpha):
    images, labels = batch
    lambdas = []
    for seed in range(8):
        mixed = mixup(images, labels, alpha, seed=tf.constant([seed, 7]))
        lambdas.append(check_mixed(images, labels, *mixed))
    assert len(set(np.round(lambdas, 6))) > 1


def test_alpha_zero_is_identity(batch):
    images, labels = batch
    assert float(sample_beta(0)) == 1.0 and float(sample_beta(0.0, seed=tf.constant([1, 2]))) == 1.0
    mixed_images, mixed_labels = mixup(images, labels, 0.0)
    np.testing.assert_array_equal(mixed_images, images)
    np.testing.assert_array_equal(mixed_labels, labels)


def test_rejects_bad_input(batch):
    images, labels = batch
    with pytest.raises(ValueError, match=">= 0"):
        mixup(images, labels, -0.1)
    with pytest.raises(TypeError, match="float labels"):
        mixup(images, np.arange(BATCH), 0.1)


def test_beta_distribution():
    seeds = tf.stack([tf.range(4000), tf.fill([4000], 11)], axis=1)
    draw = tf.function(lambda seed: tf.map_fn(lambda s: sample_beta(0.1, s), seed, fn_output_signature=tf.float32))
    lambdas = draw(seeds).numpy()
    assert np.all((lambdas >= 0) & (lambdas <= 1)) and np.isfinite(lambdas).all()
    assert abs(lambdas.mean() - 0.5) < 0.04  # sd of Beta(0.1, 0.1) is 0.456
    # U-shaped: P(0.1 < lam < 0.9) = 0.187, P(lam < 0.01 or lam > 0.99) = 0.641 for Beta(0.1, 0.1)
    assert abs(np.mean((lambdas > 0.1) & (lambdas < 0.9)) - 0.187) < 0.03
    assert abs(np.mean((lambdas < 0.01) | (lambdas > 0.99)) - 0.641) < 0.04
    # in float32 as ours: about 10% of Beta(0.1, 0.1) draws lie within 6e-8 of 1 and round to 1.0
    reference = np.random.default_rng(0).beta(0.1, 0.1, size=20_000).astype(np.float32)
    assert ks_statistic(lambdas, reference) < 1.95 * np.sqrt(1 / 4000 + 1 / 20_000)  # KS at p = 0.001


def test_stateful_sampling_distribution():
    tf.random.set_seed(3)
    lambdas = np.array([float(sample_beta(0.1)) for _ in range(1000)])
    assert len(set(lambdas)) > 800  # fresh draws (about 10% are exactly 1.0 in float32)
    assert abs(lambdas.mean() - 0.5) < 0.07
    assert np.mean((lambdas > 0.1) & (lambdas < 0.9)) < 0.3


def test_seeded_sampling_is_repeatable(batch):
    images, labels = batch
    seed = tf.constant([4, 2])
    assert float(sample_beta(0.1, seed)) == float(sample_beta(0.1, seed))
    assert float(sample_beta(1.0, seed)) != float(sample_beta(1.0, tf.constant([4, 3])))
    first, second = mixup(images, labels, 0.5, seed), mixup(images, labels, 0.5, seed)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_in_tf_function(batch):
    images, labels = batch
    stateful = tf.function(lambda x, y: mixup(x, y, 1.0))
    seeded = tf.function(lambda x, y, seed: mixup(x, y, 1.0, seed))
    lambdas = {check_mixed(images, labels, *stateful(images, labels)) for _ in range(3)}
    assert len(lambdas) > 1  # a fresh lambda per call
    for seed in range(3):
        check_mixed(images, labels, *seeded(images, labels, tf.constant([seed, 0])))


def test_in_dataset_map(batch):
    images, labels = batch
    images, labels = np.concatenate([images] * 4), np.eye(4 * BATCH, dtype=np.float32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH)
    lambdas = []
    for i, (x, y) in enumerate(data.map(lambda x, y: mixup(x, y, 1.0))):
        lambdas.append(check_mixed(images[i * BATCH : (i + 1) * BATCH], labels[i * BATCH : (i + 1) * BATCH], x, y))
    assert len(lambdas) == 4 and len(set(lambdas)) == 4
    # seeded per batch from its index: repeatable across epochs
    seeded = data.enumerate().map(lambda i, b: mixup(*b, 0.1, seed=tf.stack([i, tf.constant(5, tf.int64)])))
    first, second = list(seeded), list(seeded)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
