"""The BiT model: shapes, options, serialization, mixed precision (keras-hub style battery)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import bit_keras
from bit_keras.models.bit import BiT
from bit_keras.models.classifier import BiTImageClassifier, _convolutions
from tests.reference_bit import reference_forward

SMALL = dict(block_units=(2, 2, 2, 2), width=0.5)


@pytest.fixture(scope="module")
def small(small_npz):
    return bit_keras.create_model("R26x0.5", weights=small_npz)


def batch(height=64, width=64, n=2, seed=0):
    return np.random.default_rng(seed).random((n, height, width, 3)).astype(np.float32)


def test_config_round_trip(small):
    config = small.get_config()
    backbone = config["backbone"]
    assert backbone["class_name"] == "BiTBackbone"
    assert backbone["config"] == {
        "block_units": (2, 2, 2, 2),
        "width": 0.5,
        "normalization": "group",
        "weight_standardization": True,
        "groups": 32,
        "image_shape": (None, None, 3),
        "data_format": "channels_last",
        "dtype": keras.dtype_policies.serialize(keras.DTypePolicy("float32")),
        "name": "bi_t_backbone",  # the same in every process, however many models were made before
        "trainable": True,
    }
    assert {k: v for k, v in config.items() if k != "backbone"} == {
        "num_classes": 10,
        "preprocessor": None,
        "class_names": None,
        "pooling": "avg",
        "activation": None,
        "dropout": 0.0,
        "head_dtype": "float32",
        "name": "r26x0_5",
    }
    assert BiTImageClassifier.from_config(config).get_config() == config
    assert config["backbone"] == backbone  # from_config leaves the config it is given as it was


def test_keras_file_round_trip_is_exact(small, tmp_path):
    path = str(tmp_path / "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, BiTImageClassifier)
    x = batch()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(small(x)))
    assert loaded.get_config() == small.get_config()


def test_any_image_size(small, small_params):
    for height, width in [(64, 64), (96, 160), (70, 90)]:
        x = batch(height, width)
        ref = reference_forward(small_params, x, block_units=SMALL["block_units"])
        out = np.asarray(small.predict(x, verbose=0))
        assert np.abs(out - ref["logits"]).max() <= 5e-5 * np.abs(ref["logits"]).max()


def test_fixed_input_shape_down_to_one_pixel(small):
    """A static input size builds every unit for its real sizes: at 32px block4's 3x3 convs see 1x1 (+ padding)."""
    fixed = bit_keras.create_model("R26x0.5", num_classes=10, input_shape=(32, 32, 3))
    fixed.set_weights(small.get_weights())
    assert fixed.backbone.get_layer("block4_unit01").output.shape == (None, 1, 1, 1024)
    x = batch(32, 32)
    np.testing.assert_allclose(np.asarray(fixed(x)), np.asarray(small(x)), rtol=0, atol=1e-6)


def test_predict_on_tf_data(small):
    x = batch(n=4)
    data = tf.data.Dataset.from_tensor_slices(x).batch(2)
    # Batches of 2 vs 4: XLA compiles GroupNorm per shape, so float32 sums may round differently (~3e-6 seen).
    np.testing.assert_allclose(small.predict(data, verbose=0), small.predict(x, verbose=0), atol=1e-5)


def test_predict_on_no_images(small):
    for empty in (np.zeros((0, 32, 32, 3), np.float32), tf.zeros((0, 64, 64, 3))):
        out = small.predict(empty, verbose=0)
        assert isinstance(out, np.ndarray) and out.shape == (0, 10) and out.dtype == np.float32
    features = BiT(**SMALL, num_classes=0, dtype="mixed_bfloat16").predict(np.zeros((0, 32, 32, 3), np.float32))
    assert features.shape == (0, 1024) and features.dtype == np.float32


def test_fold_weight_standardization(small, small_params):
    folded = small.fold_weight_standardization()
    config, folded_config = small.get_config(), folded.get_config()
    assert folded_config["backbone"]["config"] == {**config["backbone"]["config"], "weight_standardization": False}
    assert {**folded_config, "backbone": None} == {**config, "backbone": None}
    assert not any(isinstance(c, bit_keras.StandardizedConv2D) for c in _convolutions(folded.backbone))
    convolutions = 1 + 8 * 3 + 4  # root, units, projections
    assert len(list(_convolutions(folded.backbone))) == len(list(_convolutions(small.backbone))) == convolutions
    x = batch(96, 80)
    ref = reference_forward(small_params, x, block_units=SMALL["block_units"])
    # The same standardized kernels, so the same outputs; both still match the float64 reference.
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(small(x)), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(folded(x)) - ref["logits"]).max() <= 5e-5 * np.abs(ref["logits"]).max()
    kernel = small.backbone.get_layer("block2_unit01").conv_b.kernel.numpy()  # the original keeps its raw kernels
    assert np.abs(kernel.mean(axis=(0, 1, 2))).max() > 1e-3
    assert folded.fold_weight_standardization() is folded
    mixed = bit_keras.load_checkpoint(
        bit_keras.create_model("R26x0.5", num_classes=10, dtype="mixed_bfloat16"), small_params
    )
    mixed_folded = mixed.fold_weight_standardization()
    assert mixed_folded.backbone.get_layer("block1_unit01").compute_dtype == "bfloat16"
    reference = np.asarray(small(x))
    unfolded_error, folded_error = (np.abs(np.asarray(m(x)) - reference).max() for m in (mixed, mixed_folded))
    assert folded_error <= max(2 * unfolded_error, 0.01 * np.abs(reference).max())  # bf16 rounding, no worse


def test_feature_extractor(small):
    features = small.feature_extractor()(batch())
    shapes = {name: tuple(value.shape) for name, value in features.items()}
    assert shapes == {
        "stem": (2, 16, 16, 32),
        "block1": (2, 16, 16, 128),
        "block2": (2, 8, 8, 256),
        "block3": (2, 4, 4, 512),
        "block4": (2, 2, 2, 1024),
        "pre_logits": (2, 1024),
    }
    assert small.num_features == 1024
    with pytest.raises(ValueError, match="unknown feature names"):
        small.feature_extractor(("block5",))


def test_features_only_and_new_head_is_zero():
    features = BiT(**SMALL, num_classes=0)
    assert tuple(features(batch()).shape) == (2, 1024)
    head = BiT(**SMALL, num_classes=5)
    np.testing.assert_array_equal(np.asarray(head(batch())), np.zeros((2, 5)))


@pytest.mark.parametrize("policy,atol", [("mixed_bfloat16", 0.1), ("mixed_float16", 0.02)])
def test_mixed_precision_outputs_float32(small, small_params, policy, atol):
    mixed = bit_keras.create_model("R26x0.5", num_classes=10, dtype=policy)
    bit_keras.load_checkpoint(mixed, small_params)
    x = batch()
    out = mixed(x)
    assert out.dtype == "float32"
    assert mixed.feature_extractor(("pre_logits",))(x)["pre_logits"].dtype == "float32"
    assert mixed.backbone.get_layer("block1_unit01").compute_dtype == policy.split("_")[1]
    reference = np.asarray(small(x))
    assert np.abs(np.asarray(out) - reference).max() <= atol * np.abs(reference).max()


@pytest.mark.parametrize("normalization,ws", [("batch", True), ("group", False), ("batch", False)])
def test_ablation_variants_train(normalization, ws):
    model = BiT(**SMALL, num_classes=3, normalization=normalization, weight_standardization=ws)
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, bit_keras.StandardizedConv2D)]
    assert bool(convs) == ws
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    history = model.fit(batch(n=4), np.array([0, 1, 2, 0]), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=0.25), "16 root channels, not divisible into 32 groups"),
        (dict(width=0.3), "whole channels"),
        (dict(normalization="layer"), "normalization must be one of"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiT(**{**SMALL, **kwargs})


def test_mixed_precision_keras_file_round_trip(tmp_path):
    model = BiT(**SMALL, num_classes=3, dtype="mixed_bfloat16")
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.policy == "mixed_bfloat16"
    assert loaded.get_layer("block1_unit01").compute_dtype == "bfloat16"
    x = batch()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
