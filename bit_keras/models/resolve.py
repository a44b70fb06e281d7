"""One resolver from what a user names to a model, for every command: a zoo checkpoint name, an architecture,
an official `.npz` (path or URL), a `.keras` file, a preset directory (`save_to_preset`) or a finished run folder.

A zoo checkpoint name means its pretrained weights, here and nowhere else. The model is a `BiTImageClassifier`
(`num_classes=0`: pooled features); it carries its class names and input size where it has them.
"""

import dataclasses
import functools
import json
import os
import shutil
import zipfile

import keras

from bit_keras import files
from bit_keras.checks import arg, check_int
from bit_keras.models import checkpoint, download, presets, zoo
from bit_keras.models.bit import BiT, check_policy
from bit_keras.models.classifier import BiTImageClassifier, BiTImageClassifierPreprocessor, BiTImageConverter
from bit_keras.models.zoo import read_labels  # callers read class names files through `resolve`

# A model folder: a preset directory (keras-hub's layout, `PRESET_FILE` first), which a finished run folder is, and
# the model as one `.keras` file. Run folders of earlier versions held the model file, its class names and metrics.
PRESET_FILE, MODEL_FILE, CLASS_NAMES_FILE, METRICS_FILE = (
    "config.json",
    "model.keras",
    "class_names.txt",
    "metrics.json",
)
SHIPPED = "BiT-R14x0.5-mnist5k"  # the zoo checkpoint inside the package: offline, always there


@dataclasses.dataclass
class ResolvedModel:
    """A model and what serving it needs: a short name, its class names and its input size (what the model carries,
    else what was found for it: a zoo checkpoint's label names, read on first use, and input size)."""

    model: BiTImageClassifier
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
        elif self.model.class_names is not None:
            return self.model.class_names
        elif self.labels_source is not None:
            names = zoo.label_names(self.labels_source, cache_dir=self.cache_dir)
        else:
            return None
        if self.model.num_classes and len(names) != self.model.num_classes:
            raise ValueError(f"{len(names)} class names for a model of {self.model.num_classes} classes")
        return names

    def serving_model(self) -> BiTImageClassifier:
        """The model with its class names (when known) and a preprocessor at its input size (when known): what a
        saved classifier should carry."""
        return with_serving(self.model, self.class_names if self.model.num_classes else None, self.image_size)


def with_serving(model: BiTImageClassifier, class_names=None, image_size=None) -> BiTImageClassifier:
    """`model` (changed in place) carrying `class_names` and, when `image_size` is given, a preprocessor resizing raw
    images to it."""
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
        model.class_names = [str(name) for name in class_names]
    if image_size is not None:
        model.preprocessor = BiTImageClassifierPreprocessor(BiTImageConverter(image_size=(image_size, image_size)))
    return model


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
        if presets.find(spec) is not None:  # a preset's alias
            return "checkpoint"
        zoo.parse_architecture(spec)  # a ValueError naming the choices
        return "architecture"
    return "folder"


def check_spec(
    spec: str,
    weights: str | None = None,
    pretrained_dir: str | None = None,
    *,
    cache_dir: str | None = None,
    offline: str | None = None,
) -> str:
    """Validate what a user named, cheaply (no download, no model built); returns `kind_of(spec)`.

    A local checkpoint's zip directory and array headers are checked (`checkpoint.check_npz`), a `.keras` file's zip
    directory; a checkpoint URL not in the download cache needs its host (or proxy) to answer within seconds, else a
    one-line ConnectionError names the ways to run offline: `offline` (default: the fine-tuning arguments
    `bit_pretrained_dir` and `model`), or the file put in the cache.
    """
    spec = str(spec)
    kind = kind_of(spec)
    if pretrained_dir is not None and kind != "checkpoint":
        raise ValueError(f"{arg('bit_pretrained_dir')} applies to checkpoint names only, not {spec!r}")
    if weights is not None and kind in ("npz", "keras", "folder"):
        raise ValueError(f"{spec} holds its weights already: leave {arg('weights')} out")
    if kind == "folder" and not os.path.exists(os.path.join(spec, PRESET_FILE)):
        if not os.path.exists(os.path.join(spec, MODEL_FILE)):
            raise FileNotFoundError(
                f"{spec} holds neither {PRESET_FILE} (a preset) nor {MODEL_FILE}: it must be a finished run, a preset "
                "or a model folder"
            )
        _check_keras_zip(os.path.join(spec, MODEL_FILE))
    if kind == "keras":
        if not os.path.exists(spec):
            raise FileNotFoundError(f"{spec} does not exist")
        _check_keras_zip(spec)
    if kind == "checkpoint" and pretrained_dir is not None and weights is None:
        path = os.path.join(pretrained_dir, f"{presets.find(spec).name}.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist ({arg('bit_pretrained_dir')} holds NAME.npz checkpoints)")
    source = _checkpoint_source(spec, kind, weights, pretrained_dir)
    if source is None:
        return kind
    if not download.is_url(source):
        checkpoint.check_npz(download.fetch(source))
    elif not os.path.exists(download.cached_path(source, cache_dir)) and source.lower().startswith(("http:", "https:")):
        ways = _offline_ways(spec, source, cache_dir, offline)
        download.check_reachable([source], f"{source} cannot be downloaded", ways)
    return kind


def _checkpoint_source(spec: str, kind: str, weights: str | None, pretrained_dir: str | None) -> str | None:
    """The path or URL of the checkpoint that loading `spec` reads; None when none is (random init, `.keras`)."""
    if kind == "npz":
        return spec
    if kind == "checkpoint" and weights is None and pretrained_dir is not None:
        return os.path.join(pretrained_dir, f"{presets.find(spec).name}.npz")
    if kind == "checkpoint" and weights in (None, "pretrained"):
        return presets.find(spec).url
    return None if weights == "pretrained" else weights  # an architecture's "pretrained": create_model says why not


def _offline_ways(spec: str, url: str, cache_dir: str | None, offline: str | None) -> str:
    """How to do without downloading `url` (for `spec`): `offline`, else the fine-tuning arguments; or the cache."""
    if offline is None and spec in zoo.CHECKPOINTS and url == zoo.CHECKPOINTS[spec].url:
        offline = (
            f"pass {arg('bit_pretrained_dir', 'DIR')} (a folder holding {spec}.npz), {arg('model', 'PATH.npz')} or "
            f"the shipped {arg('model', SHIPPED)}"
        )
    cache = f"put the file at {download.cached_path(url, cache_dir)} (the cache: ${download.CACHE_ENV})"
    return f"{offline or 'pass a local copy of the file'}, or {cache}"


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
    offline: str | None = None,
) -> ResolvedModel:
    """The model `spec` names, loaded, as a `BiTImageClassifier`.

    - a zoo checkpoint name (or alias): its pretrained weights (`pretrained_dir/NAME.npz` when given, else
      downloaded once), or `weights`; its label names and input size;
    - an architecture ("R50x1"): random initialization, or `weights` (an official `.npz` path or URL);
    - an official `.npz` path or URL: the architecture read from the file;
    - a preset directory (`save_to_preset`: a finished run folder is one), or a `.keras` file (or a folder holding
      `model.keras`): the model with the class names and input size it carries (a `BiT` of an earlier version:
      upgraded, with those of its run folder's `class_names.txt` and `metrics.json`).

    `num_classes` gives a new zero-initialized head of that size when it differs (0: pooled features);
    `new_head=True` zeroes the head even when the size is the same (BiT transfers with a zero head).
    `dtype` is a Keras dtype policy (e.g. "mixed_bfloat16"). `labels` (a file of class names, one per line)
    and `image_size` override what is found. A checkpoint that cannot be downloaded is an error naming the ways to
    run offline (`offline`, see `check_spec`).
    """
    check_int("image_size", image_size)
    check_policy(dtype)
    spec = str(spec)
    kind = check_spec(spec, weights, pretrained_dir, cache_dir=cache_dir, offline=offline)
    found_size = labels_source = None
    if kind in ("keras", "folder"):
        model, name = _load_model_file(spec, kind)
        if dtype is not None and not new_head:
            raise ValueError(f"{spec} keeps its own dtype policy; a new one needs a new head")
        found_size = model.image_size
        if new_head or dtype is not None or (num_classes is not None and num_classes != model.num_classes):
            model = model.with_new_head(model.num_classes if num_classes is None else num_classes, dtype=dtype)
    else:
        source = _checkpoint_source(spec, kind, weights, pretrained_dir)
        weights = source if kind == "checkpoint" else weights
        preset = presets.find(spec) if kind == "checkpoint" else None
        try:
            model = zoo.create_model(
                preset.name if preset else spec,
                weights=weights,
                num_classes=num_classes,
                cache_dir=cache_dir,
                dtype=dtype,
            )
        except download.DownloadError as err:
            if not download.is_url(source):
                raise
            raise download.DownloadError(f"{err}; offline, {_offline_ways(spec, source, cache_dir, offline)}") from err
        if new_head and model.num_classes:
            head = model.output_dense
            head.kernel.assign(keras.ops.zeros(head.kernel.shape))
            head.bias.assign(keras.ops.zeros(head.bias.shape))
        if preset is not None:
            found_size = preset.input_size
            labels_source = preset.name if model.num_classes == preset.num_classes and not new_head else None
        name = model.name
    image_size = found_size if image_size is None else image_size
    return ResolvedModel(model, name, image_size, labels, labels_source, cache_dir, kind)


def _load_model_file(spec: str, kind: str) -> tuple[BiTImageClassifier, str]:
    """The classifier of a preset directory, a `.keras` file or a folder holding `model.keras`, and its short name."""
    if kind == "folder" and os.path.exists(os.path.join(spec, PRESET_FILE)):
        try:
            model = BiTImageClassifier.from_preset(spec)
        except (ValueError, OSError, TypeError, KeyError) as err:
            raise ValueError(f"{spec}: not a preset of a bit_keras classifier ({_first_reason(err)})") from None
        return model, os.path.basename(os.path.abspath(spec))
    path = os.path.join(spec, MODEL_FILE) if kind == "folder" else spec
    model = load_keras(path, (BiTImageClassifier, BiT))
    if isinstance(model, BiT):
        model = _upgrade(model, os.path.dirname(os.path.abspath(path)))
    name = os.path.basename(os.path.abspath(spec)) if kind == "folder" else os.path.basename(spec)[: -len(".keras")]
    return model, name


def _upgrade(model: BiT, folder: str) -> BiTImageClassifier:
    """A `BiT` of an earlier version as a classifier, with the class names and input size its run folder held beside
    it (`class_names.txt`, `metrics.json`); this version's models carry them."""
    beside = os.path.join(folder, CLASS_NAMES_FILE)
    class_names = read_labels(beside) if os.path.exists(beside) and model.num_classes else None
    return with_serving(model.to_classifier(), class_names, _trained_size(os.path.join(folder, METRICS_FILE)))


def save_model(model: keras.Model, path: str) -> str:
    """Write `model` as a `.keras` file at `path` through a temporary file beside it, renamed when complete."""
    with files.replacing(path, ".keras") as tmp:  # Keras wants the suffix
        model.save(tmp)
    return path


# What keras-hub's `save_to_preset` writes into a preset directory (a shard index and shards only for models over
# its 10 GB shard size, which no BiT reaches).
PRESET_FILES = (
    PRESET_FILE,
    "model.weights.h5",
    "metadata.json",
    "task.json",
    "task.weights.h5",
    "preprocessor.json",
    "image_converter.json",
)


def save_preset(model: keras.Model, folder: str) -> str:
    """Write `model` (a keras-hub Task or Backbone) with keras-hub's `save_to_preset` into `folder`, which may hold
    other files: all of it into a temporary folder beside them first, then each file renamed into place; a full disk
    is a `files.DiskFullError` naming `folder`."""
    tmp = files.temporary(os.path.join(folder, "preset"))
    try:
        model.save_to_preset(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    except OSError as err:
        if err.errno in files.DISK_FULL:
            raise files.disk_full(err, folder) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_keras(path: str, expected_class: type | tuple[type, ...] | None = None) -> keras.Model:
    """The model of the `.keras` file at `path`, loaded in Keras' safe mode (nothing in the file runs); a one-line
    ValueError naming the file for a FIFO or device, a file that is no `.keras` zip, one that Keras cannot load
    safely (a function of an arbitrary module, a Python lambda, ...) or one holding no `expected_class`."""
    _check_keras_zip(path)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # Keras' TypeErrors and ValueErrors dump the whole config, over many lines
        raise ValueError(f"{path}: could not be loaded safely as a Keras model ({_first_reason(err)})") from None
    expected = expected_class if isinstance(expected_class, tuple) else (expected_class,)
    if expected_class is not None and not isinstance(model, expected):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a bit_keras {expected[0].__name__}")
    return model


def _check_keras_zip(path: str) -> None:
    """A one-line error unless `path` is a regular file holding a zip archive of plausible member sizes."""
    with files.open_regular(path, "a .keras model") as f:
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            raise ValueError(f"{path}: not a .keras model (no zip archive: truncated, or another format)") from None
        with archive:
            checkpoint.check_member_sizes(archive, path)


def _first_reason(err: BaseException) -> str:
    """The first sentence of the innermost exception of `err`'s chain (Keras wraps it in ones quoting the config)."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        err = inner
        seen.add(id(err))
    return (str(err).strip() or type(err).__name__).splitlines()[0].split(". ")[0][:200]


def _trained_size(metrics_path: str) -> int | None:
    """The evaluation size a training run recorded in its metrics.json, or None."""
    if not os.path.exists(metrics_path):
        return None
    metrics = json.loads(files.read_regular(metrics_path, "a run's metrics"))
    return metrics.get("image_size") or metrics.get("hyperrule", {}).get("crop")  # runs before image_size existed
