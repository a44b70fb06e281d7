"""Few-shot linear evaluation of a backbone, as big_vision's `evaluators/fewshot_lsr.py`: the frozen pre-logits of k
training images per class, a closed-form L2-regularized least-squares classifier onto targets in {-1, 1}, its
accuracy on the test split; for several k and seeds.

The classifier, as big_vision's: the k-shot features are whitened with their own per-dimension mean and standard
deviation (+1e-5), a constant feature `BIAS` is appended (so large that the bias is almost unregularized), and
`w = (XᵀX + l2·I)⁻¹ XᵀY` (or `Xᵀ(XXᵀ + l2·I)⁻¹Y` with fewer rows than columns, the same solution); a test image's
class is the argmax of its whitened features times `w`. Features are computed once per image and shared by every
shot count and seed; seed s draws each class's examples from `numpy.random.default_rng(s)`, as big_vision does.
"""

import json
import logging
import os

import numpy as np

from bit_keras import files
from bit_keras.checks import arg, check_finite, check_int
from bit_keras.data import pipeline, sources
from bit_keras.data.images import MAX_PIXELS
from bit_keras.defaults import FEWSHOT, TEST_FRACTION
from bit_keras.models import resolve
from bit_keras.training import hyperrule

log = logging.getLogger(__name__)

SHOTS, SEEDS, L2, BATCH = (FEWSHOT[k] for k in ("shots", "seeds", "l2", "batch"))  # big_vision's settings
BIAS = 100.0  # big_vision's BIAS_CONSTANT


def fewshot(
    model: str = resolve.SHIPPED,
    data: sources.Data | None = None,
    *,
    dataset: str | None = None,
    image_folder: str | None = None,
    data_dir: str | None = None,
    test_fraction: float | None = None,
    max_pixels: int = MAX_PIXELS,
    shots: tuple[int, ...] = SHOTS,
    seeds: int = SEEDS,
    l2: float = L2,
    resolution: int | None = None,
    batch: int = BATCH,
    cache_dir: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Few-shot linear accuracy of `model`'s pre-logits (anything `bit_keras.resolve_model` loads: a zoo name, an
    `.npz`, an architecture for random weights, a `.keras` file or a finished run folder) on `data` (a `Data`), or
    `dataset` / `image_folder` as fine-tuning reads them, or by default the embedded digits.

    Images are resized to `resolution` (default: the model's input size, else the BiT-HyperRule's evaluation crop
    for the data). Returns (and writes to `out` as JSON, when given) `{"model", "data", "resolution", "l2",
    "seeds", "shots": {k: {"mean", "std", "accuracies"}}}`; each k's accuracies are one per seed.
    """
    shots = tuple(shots)
    for k in shots:
        check_int("shots", k)
    if not shots:
        raise ValueError(f"{arg('shots')} must name at least one number of examples per class")
    check_int("seeds", seeds)
    check_finite("l2", l2, positive=True)
    check_int("resolution", resolution)
    check_int("batch", batch)
    check_int("max_pixels", max_pixels, required=True)
    check_finite("test_fraction", test_fraction, positive=True)
    if test_fraction is not None and image_folder is None:
        raise ValueError(f"{arg('test_fraction')} applies to an image folder only")
    if out is not None and os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists (pass {arg('overwrite')} to replace it)")
    resolve.check_spec(model, cache_dir=cache_dir)
    if data is None:
        sources.check_source(dataset, image_folder)
        data = sources.load(
            dataset,
            image_folder,
            data_dir,
            test_fraction=TEST_FRACTION if test_fraction is None else test_fraction,
            max_pixels=max_pixels,
        )
    resolved = resolve.resolve_model(model, num_classes=0, cache_dir=cache_dir)
    if resolution is None:
        resolution = resolved.image_size
    if resolution is None:
        resolution = hyperrule.resolution(data.median_size, data.name)[1]
    extractor = resolved.model.feature_extractor(("pre_logits",))
    train_x, train_y = features(extractor, data.train, resolution, batch)
    test_x, test_y = features(extractor, data.test, resolution, batch)
    log.info(
        f"few-shot: {model} pre-logits ({train_x.shape[1]:,} features at {resolution}px) of "
        f"{len(train_y):,} training and {len(test_y):,} test images of {data.name}"
    )
    results = {}
    for k in shots:
        accuracies = [
            accuracy(*draw(train_x, train_y, k, seed, data.num_classes), test_x, test_y, data.num_classes, l2)
            for seed in range(seeds)
        ]
        results[str(k)] = {
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies)),
            "accuracies": accuracies,
        }
    report = {
        "model": str(model),
        "data": data.name,
        "resolution": resolution,
        "l2": l2,
        "seeds": seeds,
        "shots": results,
    }
    if out is not None:
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        files.write_text(out, json.dumps(report, indent=2) + "\n")
    return report


def features(extractor, split, resolution: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The pre-logits (float64) and labels of every image of `split`, resized to `resolution` (evaluation's
    preprocessing)."""
    found, labels = [], []
    for images, label in pipeline.eval_batches(split, resolution, batch):
        found.append(np.asarray(extractor(images, training=False)["pre_logits"], np.float64))
        labels.append(np.asarray(label))
    return np.concatenate(found), np.concatenate(labels)


def draw(x: np.ndarray, y: np.ndarray, k: int, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """k examples of each class (all of a class with fewer), drawn by `seed` as big_vision does."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in range(num_classes)])
    return x[chosen], y[chosen]


def linear_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float):
    """The closed-form classifier of `x`, `y` (see the module): `(mean, std, w)`, w of shape [features + 1, classes]."""
    mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-5
    design = _with_bias((x - mean) / std)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    rows, columns = design.shape
    if rows >= columns:
        w = np.linalg.solve(design.T @ design + l2 * np.eye(columns), design.T @ targets)
    else:
        w = design.T @ np.linalg.solve(design @ design.T + l2 * np.eye(rows), targets)
    return mean, std, w


def accuracy(x, y, test_x, test_y, num_classes: int, l2: float) -> float:
    """Test accuracy of the classifier fitted on `x`, `y`."""
    mean, std, w = linear_classifier(x, y, num_classes, l2)
    predicted = np.argmax(_with_bias((test_x - mean) / std) @ w, axis=1)
    return float(np.mean(predicted == test_y))


def table(report: dict) -> str:
    """The report as a Markdown table: accuracy mean ± std (in %) per shot count."""
    lines = [f"| {report['model']} on {report['data']} ({report['seeds']} seeds) | accuracy (%) |", "|---|---|"]
    for k, result in report["shots"].items():
        lines.append(f"| {k}-shot | {100 * result['mean']:.1f} ± {100 * result['std']:.1f} |")
    return "\n".join(lines)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS)
