"""One resolver from what a user names to a model, for every command: a zoo checkpoint name, an architecture,
an official `.npz` (path or URL), a `.keras` file or a model folder (a finished run folder).

A zoo checkpoint name means its pretrained weights, here and nowhere else.
"""

import dataclasses
import functools
import json
import os
import zipfile

import keras

from bit_keras import files
from bit_keras.checks import arg, check_int
from bit_keras.models import checkpoint, download, zoo
from bit_keras.models.bit import BiT, check_policy
from bit_keras.models.zoo import read_labels  # callers read class names files through `resolve`

# A model folder (what a finished training run leaves): the model, its class names and its metrics.
MODEL_FILE, CLASS_NAMES_FILE, METRICS_FILE = "model.keras", "class_names.txt", "metrics.json"
SHIPPED = "BiT-R14x0.5-mnist5k"  # the zoo checkpoint inside the package: offline, always there


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
    if kind in ("keras", "folder"):
        path = _keras_file(spec, kind)
        if not os.path.exists(path):
            what = "a finished run or model folder" if kind == "folder" else "a file"
            raise FileNotFoundError(f"{path} does not exist ({spec} must be {what})")
        _check_keras_zip(path)
    if kind == "checkpoint" and pretrained_dir is not None and weights is None:
        path = os.path.join(pretrained_dir, f"{spec}.npz")
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
        return os.path.join(pretrained_dir, f"{spec}.npz")
    if kind == "checkpoint" and weights in (None, "pretrained"):
        return zoo.CHECKPOINTS[spec].url
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
    and `image_size` override what is found. A checkpoint that cannot be downloaded is an error naming the ways to
    run offline (`offline`, see `check_spec`).
    """
    check_int("image_size", image_size)
    check_policy(dtype)
    spec = str(spec)
    kind = check_spec(spec, weights, pretrained_dir, cache_dir=cache_dir, offline=offline)
    found_size = labels_source = labels_path = None
    if kind in ("keras", "folder"):
        path = _keras_file(spec, kind)
        model = load_keras(path, BiT)
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
        source = _checkpoint_source(spec, kind, weights, pretrained_dir)
        weights = source if kind == "checkpoint" else weights
        try:
            model = zoo.create_model(spec, weights=weights, num_classes=num_classes, cache_dir=cache_dir, dtype=dtype)
        except download.DownloadError as err:
            if not download.is_url(source):
                raise
            raise download.DownloadError(f"{err}; offline, {_offline_ways(spec, source, cache_dir, offline)}") from err
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


def load_keras(path: str, expected_class: type | None = None) -> keras.Model:
    """The model of the `.keras` file at `path`, loaded in Keras' safe mode (nothing in the file runs); a one-line
    ValueError naming the file for a FIFO or device, a file that is no `.keras` zip, one that Keras cannot load
    safely (a function of an arbitrary module, a Python lambda, ...) or one holding no `expected_class`."""
    _check_keras_zip(path)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # Keras' TypeErrors and ValueErrors dump the whole config, over many lines
        raise ValueError(f"{path}: could not be loaded safely as a Keras model ({_first_reason(err)})") from None
    if expected_class is not None and not isinstance(model, expected_class):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a bit_keras {expected_class.__name__}")
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


def _keras_file(spec: str, kind: str) -> str:
    return os.path.join(spec, MODEL_FILE) if kind == "folder" else spec


def _trained_size(metrics_path: str) -> int | None:
    """The evaluation size a training run recorded in its metrics.json, or None."""
    if not os.path.exists(metrics_path):
        return None
    metrics = json.loads(files.read_regular(metrics_path, "a run's metrics"))
    return metrics.get("image_size") or metrics.get("hyperrule", {}).get("crop")  # runs before image_size existed
