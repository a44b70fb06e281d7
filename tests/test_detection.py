"""RetinaNet on BiT (keras-hub's RetinaNetObjectDetector): anchors, heads, focal loss, per-class suppression of a
batch, augmented boxes, a COCO-folder run through the engine (its folder a preset of a detector with its class names)
and our COCO evaluation path, the SavedModel export in a fresh process and `bit-keras detect`."""

import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import bit_keras
from bit_keras.detection import data as data_lib
from bit_keras.detection import evaluation, pipeline
from bit_keras.detection.finetune import detection_rule, finetune_detector
from bit_keras.detection.objective import FocalLoss
from bit_keras.detection.retinanet import (
    BOX_ENCODING,
    PerClassSuppression,
    RetinaNet,
    create_detector,
    load_detector,
    paper_anchor_generator,
    paper_label_encoder,
)
from tests.detection_helpers import SMALL, write_coco_folder
from tests.finetune_helpers import ROOT
from tests.test_cli import BIT_KERAS, TF_NOISE, _env


def anchors(size):
    """The anchors of a `size` x `size` input, [A, 4] in pixels, levels P3..P7 in order (as the outputs)."""
    return tf.concat(list(paper_anchor_generator()(tf.zeros((size, size, 3))).values()), axis=0)


def test_anchor_count_for_512():
    assert anchors(512).shape == (9 * (64**2 + 32**2 + 16**2 + 8**2 + 4**2), 4) == (49_104, 4)
    detector = create_detector("R14x0.5", 3, image_size=256, **SMALL)
    outputs = detector(np.zeros((1, 256, 256, 3), np.float32))
    assert outputs["bbox_regression"].shape == (1, 9 * (32**2 + 16**2 + 8**2 + 4**2 + 2**2), 4)
    assert outputs["cls_logits"].shape == (1, outputs["bbox_regression"].shape[1], 3)


def test_heads_initialized_as_the_paper_and_config_round_trip(tmp_path):
    detector = create_detector("R14x0.5", 4, image_size=128, fpn_channels=32, head_channels=64, head_depth=3)
    assert isinstance(detector, keras_hub.models.RetinaNetObjectDetector)
    assert isinstance(detector.backbone, keras_hub.models.RetinaNetBackbone)
    assert detector.backbone.feature_pyramid.num_filters == 32
    class_head, box_head = detector.classification_head, detector.box_head
    np.testing.assert_allclose(class_head.prediction_layer.bias.numpy(), -np.log(0.99 / 0.01), rtol=1e-6)
    assert not np.any(box_head.prediction_layer.bias.numpy())
    assert [c.filters for c in class_head.conv_layers] == [64] * 3
    assert float(np.std(class_head.conv_layers[0].kernel.numpy())) == pytest.approx(0.01, rel=0.1)
    images = np.random.default_rng(0).uniform(size=(2, 128, 128, 3)).astype(np.float32)
    path = str(tmp_path / "detector.keras")
    detector.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RetinaNet) and loaded.get_config() == detector.get_config()
    for key, value in detector(images).items():
        np.testing.assert_allclose(loaded(images)[key].numpy(), value.numpy(), atol=1e-6)


def test_pretrained_backbone_weights_reach_the_detector():
    bit = bit_keras.create_model(
        "BiT-R14x0.5-mnist5k", weights=os.path.join(ROOT, "bit_keras/weights/BiT-R14x0.5-mnist5k.npz")
    )
    detector = create_detector("BiT-R14x0.5-mnist5k", 2, image_size=128, **SMALL)
    conv = detector.backbone.image_encoder.get_layer("block2_unit01").conv_b.kernel.numpy()
    np.testing.assert_array_equal(conv, bit.backbone.get_layer("block2_unit01").conv_b.kernel.numpy())
    # The BiT's final norm feeds no pyramid level: not trained (it would get no gradient).
    assert not any("pre_head_norm" in w.path for w in detector.trainable_weights)


def test_focal_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    labels = np.array([[2, -1, -2, 0, -1, 1]], np.float32)
    boxes, predicted = rng.normal(size=(1, 6, 4)), rng.normal(scale=0.2, size=(1, 6, 4))
    logits = rng.normal(size=(1, 6, 3))
    targets = {"boxes": tf.constant(boxes, tf.float32), "classes": tf.constant(labels)}
    outputs = {"bbox_regression": tf.constant(predicted, tf.float32), "cls_logits": tf.constant(logits, tf.float32)}
    objective = FocalLoss()
    p = 1 / (1 + np.exp(-logits))
    one_hot = np.zeros_like(p)
    for i, c in enumerate(labels[0]):
        if c >= 0:
            one_hot[0, i, int(c)] = 1
    p_t = np.where(one_hot == 1, p, 1 - p)
    alpha_t = np.where(one_hot == 1, 0.25, 0.75)
    focal = -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
    focal_sum = focal[0][labels[0] != -2].sum()
    x = np.abs(boxes - predicted)
    smooth_l1 = np.where(x < 0.1, 0.5 * x**2 / 0.1, x - 0.05)
    box_sum = smooth_l1[0][labels[0] >= 0].sum()
    class_sum, box = objective.parts(targets, outputs)
    assert float(class_sum) == pytest.approx(focal_sum, rel=1e-4)
    assert float(box) == pytest.approx(box_sum, rel=1e-4)
    assert float(objective.count(targets)) == 3.0
    assert float(objective.loss_sum(targets, outputs)) / 3.0 == pytest.approx((focal_sum + box_sum) / 3, rel=1e-4)


def test_decode_suppresses_per_class():
    detector = create_detector("R14x0.5", 2, image_size=128, **SMALL)
    detector.prediction_decoder = PerClassSuppression(confidence_threshold=0.5)
    boxes = anchors(128).numpy()
    # Two anchors at one location: the 32px and 40px squares (IoU 0.64).
    a = next(i for i, b in enumerate(boxes) if np.allclose(b, [48, 48, 80, 80]))
    b = next(i for i, box in enumerate(boxes) if np.allclose(box, [44, 44, 84, 84]))
    count = boxes.shape[0]

    def detections(class_a, class_b):
        logits = np.full((1, count, 2), -10.0, np.float32)
        logits[0, a, class_a], logits[0, b, class_b] = 3.0, 2.0
        outputs = {"bbox_regression": tf.zeros((1, count, 4)), "cls_logits": tf.constant(logits)}
        found = detector.decode_predictions(outputs, tf.zeros((1, 128, 128, 3)))
        n = int(found["num_detections"][0])
        return found["boxes"][0, :n].numpy() * 128, found["labels"][0, :n].numpy()

    kept, classes = detections(0, 0)
    np.testing.assert_allclose(kept, [[48, 48, 80, 80]], atol=1e-4)
    assert classes.tolist() == [0]
    kept, classes = detections(0, 1)
    np.testing.assert_allclose(kept, [[48, 48, 80, 80], [44, 44, 84, 84]], atol=1e-4)
    assert classes.tolist() == [0, 1]


def test_batch_suppression_equals_per_image_suppression():
    """The whole batch suppressed at once gives each image what it gets alone, and what keras-hub's (class-agnostic)
    suppression of one image gives with each class's boxes shifted apart (the per-image path exports had)."""
    rng = np.random.default_rng(0)
    count, num_classes, size = anchors(128).shape[0], 3, 128.0
    boxes = rng.uniform(0, 1, (4, count, 4)).astype(np.float32)
    boxes = np.concatenate([np.minimum(boxes[..., :2], boxes[..., 2:]), np.maximum(boxes[..., :2], boxes[..., 2:])], -1)
    logits = rng.normal(-2.0, 1.5, (4, count, num_classes)).astype(np.float32)
    decoder = PerClassSuppression()
    batch = {k: v.numpy() for k, v in decoder(tf.constant(boxes), tf.constant(logits)).items()}
    assert (batch["num_detections"] == 100).all()  # enough candidates above 0.05 to fill every image
    reference = keras_hub.layers.NonMaxSuppression("yxyx", from_logits=False, confidence_threshold=0.05)
    for i in range(4):
        alone = decoder(tf.constant(boxes[i : i + 1]), tf.constant(logits[i : i + 1]))
        for key, value in alone.items():  # the same detections (scores within float32 rounding: vectorized sigmoid)
            np.testing.assert_allclose(value.numpy()[0], batch[key][i], rtol=1e-6, err_msg=key)
        scores = tf.sigmoid(logits[i : i + 1]).numpy().reshape(1, -1)
        top = np.argsort(-scores[0], kind="stable")[:1000]
        label = top % num_classes
        shifted = np.clip(boxes[i, top // num_classes] * size, 0, size) + label[:, None] * (size + 1)
        one_class = np.eye(num_classes, dtype=np.float32)[label] * scores[0, top, None]
        kept = reference(tf.constant(shifted[None]), tf.constant(one_class[None]))
        n = int(kept["num_detections"][0])
        labels = kept["labels"][0, :n].numpy()
        assert n == batch["num_detections"][i] and labels.tolist() == batch["labels"][i].tolist()
        np.testing.assert_allclose(kept["confidence"][0, :n].numpy(), batch["confidence"][i], rtol=1e-6)
        unshifted = (kept["boxes"][0, :n].numpy() - labels[:, None] * (size + 1)) / size
        np.testing.assert_allclose(unshifted, batch["boxes"][i], atol=1e-5)


def _square_example(top, left, side, canvas=96):
    image = np.zeros((canvas, canvas, 3), np.uint8)
    image[top : top + side, left : left + side] = 255
    box = np.array([[top, left, top + side, left + side]], np.float32) / canvas
    return {"image": image, "boxes": box, "classes": np.array([1]), "image_id": np.int64(0)}


def test_augmented_boxes_follow_the_pixels():
    """Flips and scale jitter move the box with the object: the positive anchors' targets decode to the white
    square's box in the augmented image (within the resampling blur)."""
    examples = [_square_example(20, 10, 40), _square_example(50, 40, 36)]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={
            "image": tf.TensorSpec([96, 96, 3], tf.uint8),
            "boxes": tf.TensorSpec([None, 4], tf.float32),
            "classes": tf.TensorSpec([None], tf.int64),
            "image_id": tf.TensorSpec([], tf.int64),
        },
    ).apply(tf.data.experimental.assert_cardinality(2))
    size, all_anchors = 128, anchors(128)
    checked = 0
    for images, targets in pipeline.train_batches(dataset, paper_label_encoder(), size, 2, seed=3).take(6):
        for image, deltas, classes in zip(images.numpy(), targets["boxes"].numpy(), targets["classes"].numpy()):
            positive = classes >= 0
            assert positive.any() and set(classes[positive]) == {1}
            decoded = keras.utils.bounding_boxes.decode_deltas_to_boxes(
                all_anchors[positive], deltas[positive], "yxyx", "yxyx", encoded_format=BOX_ENCODING
            ).numpy()
            rows, cols = np.nonzero(image[..., 0] > 0.5)
            truth = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
            np.testing.assert_allclose(decoded, np.tile(truth, (len(decoded), 1)), atol=1.5)
            checked += 1
    assert checked == 12


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    folder = write_coco_folder(str(tmp_path_factory.mktemp("coco") / "shapes"))
    logdir = str(tmp_path_factory.mktemp("runs"))
    result = finetune_detector(
        coco_folder=folder,
        model="R14x0.5",
        logdir=logdir,
        name="shapes",
        batch=4,
        steps=4,
        eval_every=2,
        resolution=128,
        verbose=0,
        **SMALL,
    )
    return folder, result


def test_coco_folder_trains_and_evaluates(coco_run):
    result = coco_run[1]
    with open(os.path.join(result.run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics == result.metrics and metrics["metric"] == "coco_ap"
    for key in ("test_ap", "test_ap50", "test_ap75", "wall_s", "images_per_s"):
        assert isinstance(metrics[key], float), key
    assert [e["step"] for e in metrics["evals"]] == [2, 4]
    assert {"step", "test_ap", "test_ap50", "train_loss", "test_loss", "learning_rate"} <= set(metrics["evals"][0])
    assert metrics["num_train"] == 10 and metrics["num_test"] == 2  # a fifth of 12 images, rounded, for testing
    for name in ("model.keras", "config.json", "task.json", "curves.png", "detections.png", "train.log"):
        assert os.path.exists(os.path.join(result.run_dir, name)), name
    assert result.model.class_names == ["square", "bar"]


def test_detector_of_a_run_folder_knows_its_labels_and_size(coco_run):
    """The run folder is a keras-hub preset: keras-hub's `ObjectDetector.from_preset` (and ours, and the .keras file)
    load the detector with its class names and input size, and the weights it trained."""
    result = coco_run[1]
    images = np.random.default_rng(1).uniform(size=(2, 128, 128, 3)).astype(np.float32)
    expected = result.model(images)
    for loaded in (
        keras_hub.models.ObjectDetector.from_preset(result.run_dir),
        load_detector(result.run_dir),
        load_detector(os.path.join(result.run_dir, "model.keras")),
    ):
        assert isinstance(loaded, RetinaNet)
        assert (loaded.class_names, loaded.labels, loaded.image_size) == (["square", "bar"], ["square", "bar"], 128)
        for key, value in loaded(images).items():
            np.testing.assert_allclose(value.numpy(), expected[key].numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"holds no config.json: not a finished run \(model: a finetune-det"):
        load_detector(os.path.dirname(result.run_dir))


def test_perfect_detections_score_one_through_our_evaluation_path(coco_run):
    data = data_lib.from_coco_folder(coco_run[0])
    truth = evaluation.ground_truth_from_dataset(data.test)
    perfect = [{**t, "scores": np.ones(len(t["classes"]))} for t in truth]
    assert evaluation.coco_metrics(truth, perfect, data.num_classes)["ap"] == pytest.approx(1.0, abs=1e-9)
    shifted = [{**p, "boxes": p["boxes"] + [0.04, 0.04, 0.04, 0.04]} for p in perfect]
    assert evaluation.coco_metrics(truth, shifted, data.num_classes)["ap"] < 0.9


def test_export_serves_in_a_fresh_process_and_detect_draws(coco_run, tmp_path):
    folder, result = coco_run
    out = str(tmp_path / "export")
    cli = subprocess.run(
        [*BIT_KERAS, "export", "--run", result.run_dir, "--out", out],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
    )
    assert cli.returncode == 0, cli.stderr
    image_path = os.path.join(folder, "images", "img1.png")
    code = f"""
import numpy as np, tensorflow as tf, tensorflow_hub as hub, sys
assert "bit_keras" not in sys.modules
obj = hub.load({out!r})
read = lambda path: np.asarray(tf.io.decode_png(tf.io.read_file(path), channels=3)) / 255.0
image, other = read({image_path!r}), read({image_path.replace("img1", "img2")!r})
found = obj.signatures["serving_default"](images=tf.constant(image[None], tf.float32))
pair = obj.signatures["serving_default"](images=tf.constant(np.stack([other, image]), tf.float32))
named = obj.signatures["serving_bytes"](image_bytes=tf.constant([open({image_path!r}, "rb").read()]))
np.savez({str(tmp_path / "out.npz")!r}, **{{k: v.numpy() for k, v in found.items()}},
         **{{"bytes_" + k: v.numpy() for k, v in named.items()}}, **{{"pair_" + k: v.numpy() for k, v in pair.items()}})
assert "bit_keras" not in sys.modules
"""
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    served = dict(np.load(tmp_path / "out.npz", allow_pickle=True))  # the labels are strings
    for key in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        assert key in served and "bytes_" + key in served
    assert served["detection_boxes"].shape == (1, 100, 4)
    for key in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):  # a batch: as alone
        np.testing.assert_allclose(served["pair_" + key][1], served[key][0], atol=1e-5, err_msg=key)
    labels = [s.decode() for s in served["bytes_detection_labels"][0][: int(served["bytes_num_detections"][0])]]
    assert set(labels) <= {"square", "bar"}
    model = result.model
    images = tf.image.resize(np.asarray(Image.open(image_path).convert("RGB"), np.float32)[None] / 255, (128, 128))
    raw = model(images)
    np.testing.assert_allclose(served["raw_detection_scores"], tf.sigmoid(raw["cls_logits"]).numpy(), atol=1e-5)
    boxes = (
        keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors(128), raw["bbox_regression"], "yxyx", "yxyx", encoded_format=BOX_ENCODING
        ).numpy()
        / 128
    )
    np.testing.assert_allclose(served["raw_detection_boxes"], boxes, atol=1e-5)

    pictures = str(tmp_path / "pictures")
    for spec, overwrite in ((out, []), (result.run_dir, ["--overwrite"])):  # the second draws over the first
        detect = subprocess.run(
            [*BIT_KERAS, "detect", "--model", spec, image_path, "--out", pictures, "--score_threshold", "0", "--json"]
            + overwrite,
            capture_output=True,
            text=True,
            env=_env(tmp_path),
        )
        assert detect.returncode == 0, detect.stderr
        found = json.loads(detect.stdout)[0]
        assert found["detections"] and found["picture"] == os.path.join(pictures, "img1.png")
        assert found.get("replaced", False) == bool(overwrite)
        assert Image.open(found["picture"]).size == (288, 288)  # drawn on the image upscaled for legible labels


def test_bad_detection_flags_fail_before_any_folder(tmp_path):
    cases = {
        "resolution": (["--resolution", "100"], "resolution must be a multiple of 128"),
        "epochs": (["--epochs", "nan"], "epochs must be a positive finite number"),
        "head_norm": (["--head_norm", "--head_channels", "48"], "head_channels must be a multiple of 32"),
        "coco_folder": (["--coco_folder", str(tmp_path / "missing")], "missing"),
        "steps": (["--steps", "2"], "steps must be at least 4"),
    }
    runs = {
        name: subprocess.Popen(
            [*BIT_KERAS, "finetune-detector", "--logdir", str(tmp_path / name), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tmp_path),
        )
        for name, (flags, _) in cases.items()
    }
    for name, run in runs.items():
        _, err = run.communicate(timeout=300)
        lines = [line for line in err.splitlines() if not TF_NOISE.match(line)]
        assert run.returncode == 1 and len(lines) == 1 and cases[name][1] in lines[0], (name, err)
        assert lines[0].startswith("bit-keras finetune-detector: ")
        assert not os.path.exists(tmp_path / name)


def test_rule_scales_the_paper_recipe():
    rule = detection_rule(num_train=118_287, batch=256, base_lr=0.08, epochs=30)
    assert rule.steps == round(30 * 118_287 / 256) and rule.lr == pytest.approx(0.08)
    assert rule.supports == (500, round(rule.steps * 16 / 30), round(rule.steps * 22 / 30), rule.steps)
    small = detection_rule(num_train=1000, batch=16, base_lr=0.08, epochs=24)
    assert small.steps == 1500 and small.lr == pytest.approx(0.005) and small.supports[0] == 150


@pytest.mark.slow  # two detector updates compared (~75 s); classification's batch_split is tested by default
def test_batch_split_gives_the_same_update(coco_run):
    """Micro-batches share the batch's positive-anchor count: 2 x 2 images update the weights as 4 images do."""
    from bit_keras.training.trainer import Trainer

    data = data_lib.from_coco_folder(coco_run[0])
    images, targets = next(iter(pipeline.train_batches(data.train, paper_label_encoder(), 128, 4, seed=0)))
    weights = {}
    for split in (1, 2):
        keras.utils.set_random_seed(0)
        detector = create_detector("R14x0.5", 2, image_size=128, **SMALL)
        trainer = Trainer(detector, batch_split=split, loss=FocalLoss(), weight_decay=1e-4)
        trainer.compile_sgd(0.05, 0.9)
        before = [w.numpy() for w in detector.trainable_weights]
        trainer.fit(tf.data.Dataset.from_tensors((images, targets)), epochs=1, shuffle=False, verbose=0)
        weights[split] = [w.numpy() for w in detector.trainable_weights]
    moved = sum(not np.array_equal(a, b) for a, b in zip(before, weights[1]))
    assert moved > len(before) // 2
    for a, b in zip(weights[1], weights[2]):
        np.testing.assert_allclose(a, b, atol=1e-6 * (np.abs(a).max() + 1e-12) + 1e-7)


def test_mixed_precision_and_frozen_backbone(coco_run, tmp_path):
    result = finetune_detector(
        coco_folder=coco_run[0],
        model="R14x0.5",
        logdir=str(tmp_path),
        name="bf16",
        batch=4,
        steps=4,
        resolution=128,
        mixed_precision="bfloat16",
        freeze_backbone=True,
        verbose=0,
        **SMALL,
    )
    detector = result.model
    assert detector.classification_head.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in detector(np.zeros((1, 128, 128, 3), np.float32)).values())
    assert not detector.backbone.image_encoder.trainable_weights and detector.backbone.feature_pyramid.trainable_weights
    assert result.metrics["detector"]["freeze_backbone"] and result.metrics["mixed_precision"] == "mixed_bfloat16"


def test_bit_serves_as_keras_hub_image_encoder():
    """A BiT exposes its pyramid as keras-hub's backbones do (P2-P5), so keras-hub's own RetinaNet backbone
    takes it as its image encoder."""
    import keras_hub

    bit = bit_keras.create_model("R14x0.5", num_classes=0)
    assert {k: tuple(bit.pyramid_outputs[k].shape[1:]) for k in ("P2", "P5")} == {
        "P2": (None, None, 128),
        "P5": (None, None, 1024),
    }
    fpn = keras_hub.models.RetinaNetBackbone(image_encoder=bit, min_level=3, max_level=7, use_p5=True)
    levels = fpn(np.zeros((1, 256, 256, 3), np.float32))
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        f"P{level}": (1, 256 // 2**level, 256 // 2**level, 256) for level in range(3, 8)
    }
