"""keras-hub's own test batteries (`keras_hub/src/tests/test_case.py`, shipped in its wheel) on bit_keras's keras-hub
classes, the way keras-hub tests its ResNet: the backbone (pyramid keys and sizes, variable input sizes, mixed
precision, int8 quantization, data format), the image classifier task, the layers, and saving."""

import numpy as np
import pytest
from keras import ops
from keras_hub.src.tests.test_case import TestCase

from bit_keras.models.backbone import BiTBackbone
from bit_keras.models.classifier import BiTImageClassifier, BiTImageClassifierPreprocessor, BiTImageConverter
from bit_keras.models.layers import GroupNorm, PreActBottleneck, StandardizedConv2D

pytestmark = pytest.mark.timeout(900)

SMALL = {"block_units": (1, 1, 1, 1), "width": 0.5, "image_shape": (None, None, 3)}  # R14x0.5


class BiTBackboneTest(TestCase):
    def setUp(self):
        self.init_kwargs = dict(SMALL)
        self.input_data = ops.convert_to_tensor(np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)), "float32")

    def test_backbone_basics(self):
        self.run_vision_backbone_test(
            cls=BiTBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
            expected_output_shape=(2, 2, 2, 1024),
            expected_pyramid_output_keys=["P2", "P3", "P4", "P5"],
            expected_pyramid_image_sizes=[(16, 16), (8, 8), (4, 4), (2, 2)],
        )

    def test_saved_model(self):
        self.run_model_saving_test(cls=BiTBackbone, init_kwargs=self.init_kwargs, input_data=self.input_data)


class BiTImageClassifierTest(TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (2, 48, 40, 3)).astype("float32")  # raw images of another size
        self.labels = [0, 1]
        converter = BiTImageConverter(image_size=(32, 32))
        self.init_kwargs = {
            "backbone": BiTBackbone(**SMALL),
            "num_classes": 2,
            "preprocessor": BiTImageClassifierPreprocessor(converter),
            "class_names": ["cat", "dog"],
        }
        self.train_data = (self.images, self.labels)

    def test_classifier_basics(self):
        self.run_task_test(
            cls=BiTImageClassifier,
            init_kwargs=self.init_kwargs,
            train_data=self.train_data,
            expected_output_shape=(2, 2),
        )

    def test_saved_model(self):
        self.run_model_saving_test(
            cls=BiTImageClassifier, init_kwargs=self.init_kwargs, input_data=self.images[:, :32, :32] / 255
        )


class BiTLayersTest(TestCase):
    def test_standardized_conv(self):
        self.run_layer_test(
            cls=StandardizedConv2D,
            init_kwargs={"filters": 8, "kernel_size": 3, "use_bias": False},
            input_data=_normal((2, 8, 8, 4)),
            expected_output_shape=(2, 6, 6, 8),
            expected_num_trainable_weights=1,
        )

    def test_group_norm(self):
        self.run_layer_test(
            cls=GroupNorm,
            init_kwargs={"groups": 4, "relu": True},
            input_data=_normal((2, 5, 5, 8)),
            expected_output_shape=(2, 5, 5, 8),
            expected_num_trainable_weights=2,
        )

    def test_bottleneck(self):
        self.run_layer_test(
            cls=PreActBottleneck,
            init_kwargs={"filters": 32, "strides": 2},
            input_data=_normal((2, 8, 8, 32)),
            expected_output_shape=(2, 4, 4, 128),
            expected_num_trainable_weights=10,  # 3 convolutions + the projection, 3 norms x (gamma, beta)
        )


def _normal(shape):
    """A backend tensor (the batteries' precision checks read shapes from tensors, not numpy arrays)."""
    return ops.convert_to_tensor(np.random.default_rng(0).normal(size=shape), "float32")
