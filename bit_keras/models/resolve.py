"""One resolver from what a user names to a model, for every command: a zoo checkpoint name, an architecture,
an official `.npz` (path or URL), a `.keras` file or a model folder (a finished run folder).

A zoo checkpoint name means its pretrained weights, here and nowhere else.
"""

import dataclasses
import functools
import json
import os

import keras

from bit_keras import files
from bit_keras.checks import check_int
from bit_keras.models import zoo
from bit_keras.models.bit import BiT, check_policy

# A model folder (what a finished training run leaves): the model, its class names and its metrics.
MODEL_FILE, CLASS_NAMES_FILE, METRICS_FILE = "model.keras", "class_names.txt", "metrics.json"


@dataclasses.dataclass
class ResolvedModel:
    """A model and what serving it needs: a short name, its class names (read on first use) and its input size."""

    model: BiT
    name: str
    image_size: int | None  # the side a classifier resizes images to; None: unknown
    labels_path: str | None = None  # a file of class names, one per line
    labels_source: str | None = None  # a zoo checkpoint whose label names apply
    cache_dir: str | None = None
    spec_kind: str | None = None  # what was named (`kind_of`): "checkpoint", "npz", "keras", ...

    @functools.cached_property
    def class_names(self) -> list[str] | None:
        """The head's class names, or None when unknown (downloaded for zoo checkpoints, only when asked)."""
        if self.labels_path is not None:
            names = read_labels(self.labels_path)
        elif self.labels_source is not None:
            names = zoo.label_names(self.labels_source, cache_dir=self.cache_dir)
        else:
            return None
        if self.model.num_classes and len(names) != self.model.num_classes:
            raise ValueError(f"{len(names)} class names for a model of {self.model.num_classes} classes")
        return names


def kind_of(spec: str) -> str:
    """What `spec` names: "checkpoint" (zoo), "npz" (a path or URL), "keras", "folder" or "architecture";
    a ValueError for anything else."""
    spec = str(spec)
    if spec in zoo.CHECKPOINTS:
        return "checkpoint"
    if spec.endswith(".npz") or "://" in spec:
        return "npz"
    if spec.endswith(".keras"):
        return "keras"
    if zoo.ARCH_PATTERN.fullmatch(spec) or not os.path.isdir(spec):
        zoo.parse_architecture(spec)  # a ValueError naming the choices
        return "architecture"
    return "folder"


def check_spec(spec: str, weights: str | None = None, pretrained_dir: str | None = None) -> str:
    """Validate what a user named, cheaply (no download, no model built); returns `kind_of(spec)`."""
    kind = kind_of(spec)
    if pretrained_dir is not None and kind != "checkpoint":
        raise ValueError(f"bit_pretrained_dir applies to checkpoint names only, not {spec!r}")
    if weights is not None and kind in ("npz", "keras", "folder"):
        raise ValueError(f"{spec} holds its weights already: leave weights (--weights) out")
    if kind in ("keras", "folder") and not os.path.exists(_keras_file(spec, kind)):
        what = "a finished run or model folder" if kind == "folder" else "a file"
        raise FileNotFoundError(f"{_keras_file(spec, kind)} does not exist ({spec} must be {what})")
    if kind == "checkpoint" and pretrained_dir is not None and weights is None:
        path = os.path.join(pretrained_dir, f"{spec}.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist (--bit_pretrained_dir holds NAME.npz checkpoints)")
    return kind


def resolve_model(
    spec: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    new_head: bool = False,
    dtype: str | None = None,
    pretrained_dir: str | None = None,
    labels: str | None = None,
    image_size: int | None = None,
    cache_dir: str | None = None,
) -> ResolvedModel:
    """The model `spec` names, loaded.

    - a zoo checkpoint name: its pretrained weights (`pretrained_dir/NAME.npz` when given, else downloaded
      once), or `weights`; its label names and input size;
    - an architecture ("R50x1"): random initialization, or `weights` (an official `.npz` path or URL);
    - an official `.npz` path or URL: the architecture read from the file;
    - a `.keras` file, or a folder holding `model.keras` (a finished run): class names from
      `class_names.txt` beside it, the input size from `metrics.json` beside it.

    `num_classes` gives a new zero-initialized head of that size when it differs (0: pooled features);
    `new_head=True` zeroes the head even when the size is the same (BiT transfers with a zero head).
    `dtype` is a Keras dtype policy (e.g. "mixed_bfloat16"). `labels` (a file of class names, one per line)
    and `image_size` override what is found.
    """
    check_int("image_size", image_size)
    check_policy(dtype)
    kind = check_spec(spec, weights, pretrained_dir)
    spec = str(spec)
    found_size = labels_source = labels_path = None
    if kind in ("keras", "folder"):
        path = _keras_file(spec, kind)
        model = keras.saving.load_model(path)
        if not isinstance(model, BiT):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a bit_keras BiT model")
        if dtype is not None and not new_head:
            raise ValueError(f"{path} keeps its own dtype policy; a new one needs a new head")
        if new_head or dtype is not None or (num_classes is not None and num_classes != model.num_classes):
            model = model.with_new_head(model.num_classes if num_classes is None else num_classes, dtype=dtype)
        folder = os.path.dirname(os.path.abspath(path))
        beside = os.path.join(folder, CLASS_NAMES_FILE)
        labels_path = beside if os.path.exists(beside) and not new_head else None
        found_size = _trained_size(os.path.join(folder, METRICS_FILE))
        name = os.path.basename(os.path.abspath(spec)) if kind == "folder" else os.path.basename(spec)[: -len(".keras")]
    else:
        if kind == "checkpoint" and weights is None:
            weights = os.path.join(pretrained_dir, f"{spec}.npz") if pretrained_dir else "pretrained"
        model = zoo.create_model(spec, weights=weights, num_classes=num_classes, cache_dir=cache_dir, dtype=dtype)
        if new_head and model.num_classes:
            head = model.get_layer("head")
            head.kernel.assign(keras.ops.zeros(head.kernel.shape))
            head.bias.assign(keras.ops.zeros(head.bias.shape))
        entry = zoo.CHECKPOINTS.get(spec)
        if entry is not None:
            found_size = entry.input_size
            labels_source = spec if model.num_classes == entry.num_classes and not new_head else None
        name = model.name
    if labels is not None:
        labels_path, labels_source = labels, None
    image_size = found_size if image_size is None else image_size
    return ResolvedModel(model, name, image_size, labels_path, labels_source, cache_dir, kind)


def save_model(model: keras.Model, path: str) -> str:
    """Write `model` as a `.keras` file at `path` through a temporary file beside it, renamed when complete."""
    with files.replacing(path, ".keras") as tmp:  # Keras wants the suffix
        model.save(tmp)
    return path


def read_labels(path: str) -> list[str]:
    """Class names, one per line (empty lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _keras_file(spec: str, kind: str) -> str:
    return os.path.join(spec, MODEL_FILE) if kind == "folder" else spec


def _trained_size(metrics_path: str) -> int | None:
    """The evaluation size a training run recorded in its metrics.json, or None."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    return metrics.get("image_size") or metrics.get("hyperrule", {}).get("crop")  # runs before image_size existed
