"""Bit-exactness: BiT-M-R50x1 loaded from an official-layout checkpoint vs. the float64 numpy reference."""

import numpy as np
import pytest

import bit_keras
from bit_keras.models.layers import GroupNorm, StandardizedConv2D
from tests.reference_bit import reference_forward

# Issue #2: within 5e-5 of the largest |logit|; float32 noise is ~1e-5 of it, a GN eps of 1e-3 ~1.7e-4.
TOL = 5e-5
SIZES = [(64, 64), (128, 128), (96, 160)]  # even at every stride-2 step: 'same' padding would differ here


@pytest.fixture(scope="module")
def r50(r50_npz):
    model = bit_keras.create_model("BiT-M-R50x1", weights=r50_npz)
    return model, model.feature_extractor()


def images(height, width, seed=0):
    return np.random.default_rng(seed).random((2, height, width, 3)).astype(np.float32)


def errors(model, extractor, params, x):
    """Max abs errors: logits and pre-logits relative to max|logit|, intermediates to their own max."""
    ref = reference_forward(params, x)
    out = {name: np.asarray(value) for name, value in extractor(x).items()}
    out["logits"] = np.asarray(model(x))
    scale = np.abs(ref["logits"]).max()
    return {
        name: np.abs(out[name] - ref[name]).max()
        / (scale if name in ("logits", "pre_logits") else np.abs(ref[name]).max())
        for name in ref
    }


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_r50x1_matches_float64_reference(r50, r50_params, size):
    model, extractor = r50
    assert model.num_classes == 1000
    errs = errors(model, extractor, r50_params, images(*size))
    assert set(errs) == {"stem", "block1", "block2", "block3", "block4", "pre_logits", "logits"}
    bad = {name: err for name, err in errs.items() if err > TOL}
    assert not bad, f"outputs off the reference by more than {TOL} (relative): {bad}"


def _set_epsilon(model, layer_type, value):
    for layer in model._flatten_layers():
        if isinstance(layer, layer_type):
            layer.epsilon = value


@pytest.mark.parametrize(
    "layer_type,wrong_epsilon",
    [(GroupNorm, 1e-3), (StandardizedConv2D, 1e-5)],
    ids=["gn_eps_1e-3", "ws_eps_1e-5"],
)
def test_tolerance_catches_wrong_epsilons(r50_npz, r50_params, layer_type, wrong_epsilon):
    """The parity tolerance is tight enough to see Keras' default GN epsilon or big_vision's WS epsilon."""
    model = bit_keras.create_model("BiT-M-R50x1", weights=r50_npz)
    _set_epsilon(model, layer_type, wrong_epsilon)
    errs = errors(model, model.feature_extractor(), r50_params, images(64, 64))
    assert errs["logits"] > 2 * TOL, errs
