"""Model files that cannot hurt and model errors that say what to do: `.keras` files loaded in safe mode (one line
naming the file), FIFOs refused, malformed `.npz` members named, and an unreachable checkpoint download refused in
seconds, before any data is read, naming the ways to run offline. The command line gives the same as one line."""

import dataclasses
import json
import os
import pathlib
import shutil
import time
import zipfile

import keras
import pytest
import tensorflow as tf

import bit_keras
from bit_keras import checks, cli
from bit_keras.models import checkpoint, download, resolve, zoo
from tests.test_cli import message_lines

pytestmark = pytest.mark.timeout(120)

CLOSED = "http://127.0.0.1:1"  # nothing listens on port 1: a connection is refused at once
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def one_line(capsys, *names):
    """The CLI's single stderr line, checked to name each of `names`."""
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert all(name in lines[0] for name in names), lines
    return lines[0]


# ----------------------------------------------------------------------------- .keras files


@pytest.fixture(scope="module")
def keras_parts(tmp_path_factory):
    """The members of a real `.keras` file of a small Sequential model: config.json, metadata.json, weights."""
    path = tmp_path_factory.mktemp("keras") / "dense.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="relu")]).save(path)
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_keras(path, parts, activation=None):
    """A `.keras` zip of `parts`, its Dense layer's activation replaced by `activation` (a serialized config)."""
    config = json.loads(parts["config.json"])
    if activation is not None:
        config["config"]["layers"][-1]["config"]["activation"] = activation
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, json.dumps(config) if name == "config.json" else data)
    return str(path)


@pytest.mark.parametrize("module,function", [("posix", "system"), ("bit_keras_test_gadget", "touch")])
def test_keras_file_naming_a_module_function_is_refused_and_nothing_runs(
    module, function, keras_parts, tmp_path, monkeypatch, capsys
):
    """The CVE-2025-1550 pattern: a layer's activation names any module's function. Keras' safe mode refuses it;
    the error is one line naming the file, not Keras' dump of the layer config, and nothing was imported or run."""
    marker = tmp_path / "ran"
    touch = f"pathlib.Path({str(marker)!r}).touch()"
    (tmp_path / "bit_keras_test_gadget.py").write_text(f"import pathlib\n{touch}\n\n\ndef touch(*args):\n    {touch}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    activation = {"module": module, "class_name": "function", "config": function, "registered_name": None}
    evil = write_keras(tmp_path / "evil.keras", keras_parts, activation)
    for load in (lambda: resolve.load_keras(evil), lambda: resolve.resolve_model(evil)):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{evil}: could not be loaded safely as a Keras model (Could not locate function ")
        assert "\n" not in message and "config" not in message and len(message) < 300
    out = tmp_path / "out.keras"
    assert cli.main(["convert", evil, "--out", str(out)]) == 1
    one_line(capsys, evil, "could not be loaded safely")
    assert not marker.exists() and not out.exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "truncated", "not a zip"])
def test_keras_files_that_are_no_keras_zip_are_one_line(kind, keras_parts, tmp_path, capsys):
    path = tmp_path / "m.keras"
    if kind == "fifo":
        os.mkfifo(path)
        expected = "a FIFO, not a regular file: only regular files are read as a .keras model"
    else:
        data = pathlib.Path(write_keras(tmp_path / "ok.keras", keras_parts)).read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"not a model\n")
        expected = "not a .keras model (no zip archive: truncated, or another format)"
    for load in (resolve.load_keras, resolve.resolve_model, resolve.check_spec):
        with pytest.raises(ValueError) as info:
            load(str(path))
        assert str(info.value) == f"{path}: {expected}"
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "out.keras")]) == 1
    one_line(capsys, str(path), expected)


def test_keras_file_of_another_class(keras_parts, tmp_path):
    path = write_keras(tmp_path / "dense.keras", keras_parts)
    assert isinstance(resolve.load_keras(path), keras.Sequential)
    assert isinstance(resolve.load_keras(path, keras.Sequential), keras.Sequential)
    with pytest.raises(ValueError, match=f"^{path} holds a Sequential, not a bit_keras BiTImageClassifier$"):
        resolve.resolve_model(path)
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(broken, "w") as archive:  # a zip, but no config.json
        archive.writestr("metadata.json", keras_parts["metadata.json"])
    with pytest.raises(ValueError, match=f"^{broken}: could not be loaded safely as a Keras model \\(.+\\)$"):
        resolve.load_keras(str(broken))


# ----------------------------------------------------------------------------- FIFOs and devices


@pytest.mark.timeout(30)
def test_fifos_and_devices_are_refused_by_name(tmp_path, small_npz, capsys):
    """A FIFO (a read would wait for a writer forever) or /dev/zero (never ends) named as a checkpoint or labels."""
    fifo = tmp_path / "weights.npz"
    os.mkfifo(fifo)
    fifo = str(fifo)
    regular = "not a regular file: only regular files are read as"
    for read in (checkpoint.read_npz, checkpoint.check_npz):
        with pytest.raises(checkpoint.CheckpointError, match=f"^{fifo}: a FIFO, {regular} a .npz checkpoint$"):
            read(fifo)
    for read in (resolve.check_spec, resolve.resolve_model):
        with pytest.raises(ValueError, match=f"^{fifo}: a FIFO, {regular} a model or label file$"):
            read(fifo)
    with pytest.raises(checkpoint.CheckpointError, match=f"^/dev/zero: a character device, {regular} a .npz"):
        checkpoint.read_npz("/dev/zero")
    for weights in (fifo, "/dev/zero"):
        with pytest.raises(ValueError, match=f"^{weights}: a (FIFO|character device), {regular} a model or label"):
            bit_keras.create_model("R26x0.5", weights=weights)
        with pytest.raises(ValueError, match=f"^{weights}: a (FIFO|character device), {regular}"):
            download.fetch(weights)
    labels = tmp_path / "labels.txt"
    os.mkfifo(labels)
    with pytest.raises(ValueError, match=f"^{labels}: a FIFO, {regular} a file of class names$"):
        resolve.read_labels(str(labels))
    with pytest.raises(ValueError, match=f"^{labels}: a FIFO, {regular} a file of class names$"):
        _ = resolve.resolve_model(small_npz, labels=str(labels)).class_names
    assert cli.main(["convert", fifo, "--out", str(tmp_path / "out.keras")]) == 1
    one_line(capsys, fifo, "a FIFO")


# ----------------------------------------------------------------------------- .npz members, early


def test_npz_member_without_npy_suffix_is_named_before_any_data_is_read(tmp_path, capsys):
    """A member named like a key but not `.npy`: np.load gives its raw bytes. Refused naming the file and member,
    in `convert` and in `finetune` (before the data and the run folder)."""
    path = tmp_path / "x.npz"
    key = "resnet/root_block/standardized_conv2d/kernel"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(key, os.urandom(100))
    expected = f"{path}: member {key!r} is not an .npy array: not a checkpoint"
    for call in (
        lambda: bit_keras.create_model(str(path)),
        lambda: resolve.check_spec(str(path)),
        lambda: bit_keras.finetune(model=str(path), logdir=str(tmp_path / "runs"), verbose=0),
    ):
        with pytest.raises(checkpoint.CheckpointError) as info:
            call()
        assert str(info.value) == expected
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "out.keras")]) == 1
    one_line(capsys, expected)
    assert cli.main(["finetune", "--model", str(path), "--logdir", str(tmp_path / "runs")]) == 1
    one_line(capsys, expected)
    assert sorted(os.listdir(tmp_path)) == ["x.npz"]


# ----------------------------------------------------------------------------- offline


@pytest.fixture
def unreachable(monkeypatch, tmp_path):
    """BiT-M-R50x1 at a URL nothing answers, an empty download cache and no proxy."""
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    entry = dataclasses.replace(zoo.CHECKPOINTS["BiT-M-R50x1"], url=f"{CLOSED}/bit_models/BiT-M-R50x1.npz")
    monkeypatch.setitem(zoo.CHECKPOINTS, entry.name, entry)
    return entry


def test_offline_default_model_fails_in_seconds_before_the_folder_scan(unreachable, tmp_path, capsys):
    """`finetune --image_folder photos` offline: the checkpoint's host is probed before the folder is scanned (a
    real folder of one class and one image here: only the probe can fail) and the error names the ways to run
    offline."""
    cached = download.cached_path(unreachable.url)
    ways = (
        f"offline, pass {{}} (a folder holding BiT-M-R50x1.npz), {{}} or the shipped {{}}, or put the file at "
        f"{cached} (the cache: $BIT_KERAS_CACHE)"
    )
    (tmp_path / "photos" / "digit").mkdir(parents=True)
    (tmp_path / "photos" / "digit" / "one.png").write_bytes(tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy())
    photos, runs = str(tmp_path / "photos"), str(tmp_path / "runs")
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        bit_keras.finetune(image_folder=photos, logdir=runs, verbose=0)
    assert time.monotonic() - start < 10
    python = ways.format("bit_pretrained_dir=DIR", "model=PATH.npz", "model=BiT-R14x0.5-mnist5k")
    assert str(info.value) == (
        f"{unreachable.url} cannot be downloaded: 127.0.0.1:1 does not answer (Connection refused); {python}"
    )
    with checks.command_line(), pytest.raises(ConnectionError) as info:
        resolve.check_spec("BiT-M-R50x1")
    flags = ways.format("--bit_pretrained_dir DIR", "--model PATH.npz", "--model BiT-R14x0.5-mnist5k")
    assert str(info.value).endswith(flags)
    assert cli.main(["finetune", "--image_folder", photos, "--logdir", runs]) == 1
    one_line(capsys, unreachable.url, "BiT-M-R50x1.npz", "does not answer")
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # no run folder, no cache folder
    assert sorted(os.listdir(tmp_path / "photos" / "digit")) == ["one.png"]  # nothing written into the data


def test_offline_ways_do_not_probe(unreachable, small_npz, tmp_path):
    """A checkpoint in `bit_pretrained_dir`, or already in the download cache, needs no network."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    shutil.copyfile(small_npz, folder / "BiT-M-R50x1.npz")
    assert resolve.check_spec("BiT-M-R50x1", pretrained_dir=str(folder)) == "checkpoint"
    small = dataclasses.replace(unreachable, name="BiT-T-R26x0.5", arch="R26x0.5", num_classes=10)
    small = dataclasses.replace(small, url=f"{CLOSED}/bit_models/BiT-T-R26x0.5.npz")
    zoo.CHECKPOINTS[small.name] = small
    try:
        with pytest.raises(ConnectionError):
            resolve.check_spec(small.name)
        cached = download.cached_path(small.url)
        os.makedirs(os.path.dirname(cached))
        shutil.copyfile(small_npz, cached)
        assert resolve.resolve_model(small.name).model.num_classes == 10
    finally:
        del zoo.CHECKPOINTS[small.name]


def test_failed_checkpoint_download_names_the_offline_ways(http_server, tmp_path, monkeypatch):
    """A host that answers (the probe passes) but has no file: the download's own error, with the same ways."""
    entry = dataclasses.replace(zoo.CHECKPOINTS["BiT-M-R50x1"], url=f"{http_server.base}/bit_models/BiT-M-R50x1.npz")
    monkeypatch.setitem(zoo.CHECKPOINTS, entry.name, entry)
    cache = str(tmp_path / "cache")
    with pytest.raises(download.DownloadError) as info:
        resolve.resolve_model("BiT-M-R50x1", cache_dir=cache)
    assert str(info.value) == (
        f"{entry.url}: HTTP 404 Not Found; offline, pass bit_pretrained_dir=DIR (a folder holding BiT-M-R50x1.npz), "
        f"model=PATH.npz or the shipped model=BiT-R14x0.5-mnist5k, or put the file at "
        f"{download.cached_path(entry.url, cache)} (the cache: $BIT_KERAS_CACHE)"
    )
    with pytest.raises(download.DownloadError, match=r"404 Not Found; offline, pass --weights PATH.npz, or put the"):
        resolve.resolve_model("BiT-M-R50x1", cache_dir=cache, offline="pass --weights PATH.npz")
    assert http_server.counts["/bit_models/BiT-M-R50x1.npz"] == 2
