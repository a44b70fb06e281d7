"""Shared fixtures: a random checkpoint in the official layout and the model loaded from it."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from tests.official_npz import random_checkpoint, write_npz  # noqa: E402

R50 = (3, 4, 6, 3)


@pytest.fixture(scope="session")
def r50_params():
    return random_checkpoint(R50, width=1, num_classes=1000, seed=0)


@pytest.fixture(scope="session")
def r50_npz(r50_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "BiT-M-R50x1-random.npz"
    write_npz(path, r50_params)
    return str(path)


@pytest.fixture(scope="session")
def small_params():
    return random_checkpoint((2, 2, 2, 2), width=0.5, num_classes=10, seed=1)


@pytest.fixture(scope="session")
def small_npz(small_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "R26x0.5-random.npz"
    write_npz(path, small_params)
    return str(path)
