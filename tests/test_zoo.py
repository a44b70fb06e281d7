"""Tests for bit_keras.zoo: the checkpoint registry, architectures, parameter counts, create_model and labels.

Checkpoints are random ones in the official layout (tests/official_npz.py); outputs are compared with the
independent float64 numpy forward pass of tests/reference_bit.py. Downloads go to a local HTTP server.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

import bit_keras
from bit_keras import checks
from bit_keras.models import download, zoo
from tests.official_npz import write_npz

pytestmark = pytest.mark.timeout(120)

SMALL_UNITS = (2, 2, 2, 2)
ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
BUCKET = "https://storage.googleapis.com/bit_models"


def assert_close(actual, expected):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0.1  # a meaningful comparison, not of all-zero outputs
    np.testing.assert_allclose(actual, expected, rtol=0, atol=5e-5 * scale)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_urls():
    expected = {}
    for arch in ARCHS:
        expected[f"BiT-S-{arch}"] = (arch, 1000, f"{BUCKET}/BiT-S-{arch}.npz", "imagenet1k")
        expected[f"BiT-M-{arch}"] = (arch, 21843, f"{BUCKET}/BiT-M-{arch}.npz", "imagenet21k")
        expected[f"BiT-M-{arch}-ILSVRC2012"] = (arch, 1000, f"{BUCKET}/BiT-M-{arch}-ILSVRC2012.npz", "imagenet1k")
    for size in (224, 160):
        expected[f"BiT-R50x1-distilled-{size}"] = ("R50x1", 1000, f"{BUCKET}/distill/R50x1_{size}.npz", "imagenet1k")
    shipped = os.path.join(os.path.dirname(bit_keras.__file__), "weights", "BiT-R14x0.5-mnist5k.npz")
    expected["BiT-R14x0.5-mnist5k"] = ("R14x0.5", 10, shipped, "digits")
    assert len(expected) == 21
    assert set(zoo.CHECKPOINTS) == set(expected)
    assert bit_keras.CHECKPOINTS is zoo.CHECKPOINTS
    for name, (arch, classes, url, labels) in expected.items():
        entry = zoo.CHECKPOINTS[name]
        assert (entry.name, entry.arch, entry.num_classes, entry.url, entry.labels) == (
            name,
            arch,
            classes,
            url,
            labels,
        )
        assert (entry.block_units, entry.width) == zoo.parse_architecture(arch)
    assert zoo.CHECKPOINTS["BiT-R50x1-distilled-160"].input_size == 160
    assert zoo.CHECKPOINTS["BiT-R50x1-distilled-224"].input_size == 224
    assert zoo.CHECKPOINTS["BiT-M-R101x3"].upstream == "ImageNet-21k"
    assert zoo.CHECKPOINTS["BiT-S-R101x3"].upstream == "ILSVRC-2012"


def test_list_models():
    everything = bit_keras.list_models()
    assert set(zoo.CHECKPOINTS) <= set(everything)
    assert {"R26x0.5", "R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"} <= set(everything)
    assert len(everything) == len(set(everything))
    pretrained = zoo.list_models(pretrained_only=True)
    assert set(pretrained) == set(zoo.CHECKPOINTS)
    assert "R50x1" not in pretrained
    for name in everything:  # every listed name is accepted by create_model's name resolution
        if name not in zoo.CHECKPOINTS:
            zoo.parse_architecture(name)


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("R50x1", ((3, 4, 6, 3), 1)),
        ("R50x3", ((3, 4, 6, 3), 3)),
        ("R101x1", ((3, 4, 23, 3), 1)),
        ("R152x4", ((3, 8, 36, 3), 4)),
        ("R26x0.5", ((2, 2, 2, 2), 0.5)),
        ("R14x0.5", ((1, 1, 1, 1), 0.5)),
    ],
)
def test_parse_architecture(arch, expected):
    assert zoo.parse_architecture(arch) == expected
    assert isinstance(zoo.parse_architecture(arch)[1], type(expected[1]))


@pytest.mark.parametrize("bad", ["R34x1", "R50", "resnet50", "r50x1", "R50x", "BiT-X-R50x1", "R50x1 ", ""])
def test_parse_architecture_rejects_unknown(bad):
    with pytest.raises(ValueError, match="bit-keras models"):
        zoo.parse_architecture(bad)
    with pytest.raises(ValueError, match="bit-keras models"):
        zoo.create_model(bad, num_classes=0)


@pytest.mark.parametrize(
    "name, suggested",
    [
        ("BiT-M-R50x2", "'BiT-M-R50x3', 'BiT-M-R50x1', 'BiT-M-R152x2'"),
        ("BiT-M-R5Ox1", "'BiT-M-R50x1', 'BiT-S-R50x1', 'BiT-M-R50x3'"),
        ("bit-m-r50x1", "'BiT-M-R50x1'"),
        ("r50x1", "'R50x1'"),
        ("BiT-R14x0.5-mnist", "'BiT-R14x0.5-mnist5k'"),
    ],
)
def test_misspelled_names_suggest_the_closest(name, suggested):
    message = f"^unknown model '{name}': did you mean {suggested}\\? see `bit-keras models`$"
    for weights in (None, "pretrained"):
        with pytest.raises(ValueError, match=message):
            zoo.create_model(name, weights=weights, num_classes=0)


@pytest.mark.parametrize(
    "arch, classes", [("R14x0.5", 10), ("R26x0.5", 0), ("R26x0.5", 10), ("R50x1", 0), ("R50x1", 1000)]
)
def test_parameter_count_matches_model(arch, classes):
    model = zoo.create_model(arch, num_classes=classes)
    assert zoo.parameter_count(arch, classes) == model.count_params()


def test_parameter_count_r50x1():
    assert bit_keras.parameter_count("R50x1", 1000) == 25_549_352
    assert bit_keras.parameter_count("R50x1") == 25_549_352 - (2048 * 1000 + 1000)


def test_architecture_without_classes_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        zoo.create_model("R26x0.5")


# ----------------------------------------------------------------------------- create_model from files


def test_create_model_arch_with_local_weights(small_npz, small_images, small_reference):
    model = zoo.create_model("R26x0.5", weights=small_npz, progress=False)
    assert (model.backbone.block_units, model.backbone.width, model.num_classes) == (SMALL_UNITS, 0.5, 10)
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlib"])
def test_create_model_from_npz_path_infers_architecture(small_npz, small_images, small_reference, as_path):
    model = zoo.create_model(pathlib.Path(small_npz) if as_path else small_npz, progress=False)
    assert (model.backbone.block_units, model.backbone.width, model.num_classes) == (SMALL_UNITS, 0.5, 10)
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])


def test_checkpoint_path_and_weights_together_rejected(small_npz):
    with pytest.raises(ValueError, match="is a checkpoint file already: leave weights out$"):
        zoo.create_model(small_npz, weights=small_npz)


def test_new_head_is_zero_and_features_still_match(small_npz, small_images, small_reference):
    model = zoo.create_model("R26x0.5", weights=small_npz, num_classes=7, progress=False)
    assert model.num_classes == 7
    logits = model.predict(small_images, verbose=0)
    assert logits.shape == (2, 7)
    assert np.all(logits == 0.0)
    other = np.random.default_rng(9).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    assert np.all(model.predict(other, verbose=0) == 0.0)
    features = model.feature_extractor(("pre_logits",)).predict(small_images, verbose=0)["pre_logits"]
    assert_close(features, small_reference["pre_logits"])


def test_num_classes_zero_gives_pooled_features(small_npz, small_images, small_reference):
    model = zoo.create_model(small_npz, num_classes=0, progress=False)
    assert model.num_classes == 0
    features = model.predict(small_images, verbose=0)
    assert features.shape == (2, 1024)
    assert_close(features, small_reference["pre_logits"])


def test_same_num_classes_keeps_file_head(small_npz, small_images, small_reference):
    model = zoo.create_model("R26x0.5", weights=small_npz, num_classes=10, progress=False)
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])


def test_wrong_architecture_for_file_is_checkpoint_error(small_npz):
    with pytest.raises(bit_keras.CheckpointError, match=r"root_block.*\(7, 7, 3, 32\).*\(7, 7, 3, 64\)"):
        zoo.create_model("R26x1", weights=small_npz, progress=False)
    with pytest.raises(bit_keras.CheckpointError, match="missing key"):
        zoo.create_model("R50x0.5", weights=small_npz, progress=False)


def test_missing_head_bias_is_named(small_params, tmp_path):
    params = dict(small_params)
    del params["resnet/head/conv2d/bias"]
    write_npz(tmp_path / "no_bias.npz", params)
    with pytest.raises(bit_keras.CheckpointError, match="missing key 'resnet/head/conv2d/bias'"):
        zoo.create_model(str(tmp_path / "no_bias.npz"), progress=False)


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def served_checkpoint(http_server, small_npz, monkeypatch):
    """A registry entry `BiT-T-R26x0.5` whose URL is small_npz's bytes on the local server."""
    url = http_server.add("/bit_models/BiT-T-R26x0.5.npz", pathlib.Path(small_npz).read_bytes())
    entry = dataclasses.replace(
        zoo.CHECKPOINTS["BiT-S-R50x1"], name="BiT-T-R26x0.5", arch="R26x0.5", num_classes=10, url=url
    )
    monkeypatch.setitem(zoo.CHECKPOINTS, entry.name, entry)
    return entry


def test_pretrained_needs_a_checkpoint_name():
    with pytest.raises(ValueError) as info:
        zoo.create_model("R50x1", weights="pretrained")
    assert str(info.value) == (
        "'R50x1' is an architecture: weights='pretrained' needs one of its checkpoints BiT-S-R50x1, BiT-M-R50x1, "
        "BiT-M-R50x1-ILSVRC2012, BiT-R50x1-distilled-224, BiT-R50x1-distilled-160; see `bit-keras models`"
    )
    with pytest.raises(ValueError, match=r"^'R26x0.5' is an architecture: .* \(none is released for it\); see `bit"):
        zoo.create_model("R26x0.5", weights="pretrained")


def test_shipped_checkpoint_digest_is_checked(tmp_path):
    entry = zoo.CHECKPOINTS["BiT-R14x0.5-mnist5k"]
    data = pathlib.Path(entry.url).read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert all(e.sha256 is None for e in zoo.CHECKPOINTS.values() if e is not entry)
    copy = tmp_path / "BiT-R14x0.5-mnist5k.npz"
    shutil.copyfile(entry.url, copy)
    with open(copy, "r+b") as f:  # one flipped byte inside a weight: still a readable .npz
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 1]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(zoo.CHECKPOINTS, entry.name, dataclasses.replace(entry, url=str(copy)))
        with pytest.raises(bit_keras.DownloadError) as info:
            zoo.create_model(entry.name, weights="pretrained", progress=False)
    assert str(info.value).startswith(f"{copy}: SHA-256 mismatch: expected {entry.sha256}, got ")
    assert "\n" not in str(info.value) and copy.exists()


def test_registry_digest_is_checked_on_download(served_checkpoint, http_server, small_npz, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    right = hashlib.sha256(pathlib.Path(small_npz).read_bytes()).hexdigest()
    wrong = dataclasses.replace(served_checkpoint, sha256=hashlib.sha256(b"other").hexdigest())
    monkeypatch.setitem(zoo.CHECKPOINTS, wrong.name, wrong)
    with pytest.raises(bit_keras.DownloadError, match=f"^{served_checkpoint.url}: SHA-256 mismatch: expected "):
        zoo.create_model(wrong.name, weights="pretrained", cache_dir=cache, progress=False)
    assert not os.path.exists(download.cached_path(served_checkpoint.url, cache))
    monkeypatch.setitem(zoo.CHECKPOINTS, wrong.name, dataclasses.replace(wrong, sha256=right))
    assert zoo.create_model(wrong.name, weights="pretrained", cache_dir=cache, progress=False).num_classes == 10
    assert http_server.counts["/bit_models/BiT-T-R26x0.5.npz"] == 2


def test_unreadable_cached_download_is_fetched_again_once(
    http_server, small_npz, tmp_path, small_images, small_reference
):
    path = "/bit_models/flaky.npz"
    good = pathlib.Path(small_npz).read_bytes()
    url = http_server.add(path, b"\0" * len(good))  # a complete download of the wrong bytes
    cache = str(tmp_path / "cache")
    cached = download.fetch(url, cache_dir=cache, progress=False)
    with pytest.raises(bit_keras.CheckpointError, match="not a readable .npz checkpoint") as info:
        zoo.create_model("R26x0.5", weights=url, cache_dir=cache, progress=False)
    assert "\n" not in str(info.value)
    assert http_server.counts[path] == 2  # fetched once more, wrong again, and not kept
    assert not os.path.exists(cached)

    download.fetch(url, cache_dir=cache, progress=False)
    http_server.add(path, good)
    model = zoo.create_model("R26x0.5", weights=url, cache_dir=cache, progress=False)
    assert http_server.counts[path] == 4
    assert pathlib.Path(cached).read_bytes() == good
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])


def test_pretrained_downloads_registry_url_once(
    served_checkpoint, http_server, tmp_path, small_images, small_reference
):
    cache = str(tmp_path / "cache")
    model = zoo.create_model(served_checkpoint.name, weights="pretrained", cache_dir=cache, progress=False)
    path = "/bit_models/BiT-T-R26x0.5.npz"
    assert http_server.counts[path] == 1
    cached = download.cached_path(served_checkpoint.url, cache)
    assert cached.startswith(cache + os.sep)
    assert pathlib.Path(cached).read_bytes() == http_server.routes[path][0]
    assert (model.backbone.block_units, model.backbone.width, model.num_classes) == (SMALL_UNITS, 0.5, 10)
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])

    again = zoo.create_model(served_checkpoint.name, weights="pretrained", cache_dir=cache, progress=False)
    assert http_server.counts[path] == 1  # served from the cache
    assert_close(again.predict(small_images, verbose=0), small_reference["logits"])


def test_registry_name_without_weights_is_random_init(served_checkpoint, http_server):
    model = zoo.create_model(served_checkpoint.name, num_classes=None)
    assert model.num_classes == 10
    assert sum(http_server.counts.values()) == 0


def test_url_weights(http_server, small_npz, tmp_path, small_images, small_reference):
    url = http_server.add("/models/R26x0.5-random.npz", pathlib.Path(small_npz).read_bytes())
    cache = str(tmp_path / "cache")
    model = zoo.create_model("R26x0.5", weights=url, cache_dir=cache, progress=False)
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])
    assert os.path.exists(download.cached_path(url, cache))
    # the URL itself as the model name: architecture read from the downloaded file (already cached)
    model = zoo.create_model(url, num_classes=0, cache_dir=cache, progress=False)
    assert http_server.counts["/models/R26x0.5-random.npz"] == 1
    assert_close(model.predict(small_images, verbose=0), small_reference["pre_logits"])


def test_url_404_raises_download_error(http_server, tmp_path):
    url = http_server.base + "/bit_models/missing.npz"
    with pytest.raises(bit_keras.DownloadError, match="404") as info:
        zoo.create_model("R26x0.5", weights=url, cache_dir=str(tmp_path), progress=False)
    assert url in str(info.value)
    assert http_server.counts["/bit_models/missing.npz"] == 1
    assert not os.path.exists(download.cached_path(url, str(tmp_path)))


# ----------------------------------------------------------------------------- labels


def test_label_names(http_server, monkeypatch, tmp_path):
    index = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"], "2": ["n01484850", "great_white_shark"]}
    lemmas = "organism, being\nbenthos\n\nheterotroph\n"
    monkeypatch.setitem(
        zoo.LABEL_SOURCES, "imagenet1k", http_server.add("/data/imagenet_class_index.json", json.dumps(index).encode())
    )
    monkeypatch.setitem(
        zoo.LABEL_SOURCES, "imagenet21k", http_server.add("/bit_models/imagenet21k_wordnet_lemmas.txt", lemmas.encode())
    )
    cache = str(tmp_path / "cache")
    assert bit_keras.label_names("BiT-S-R50x1", cache_dir=cache, progress=False) == [
        "tench",
        "goldfish",
        "great_white_shark",
    ]
    assert zoo.label_names("BiT-M-R50x1-ILSVRC2012", cache_dir=cache, progress=False)[1] == "goldfish"
    assert zoo.label_names("BiT-M-R50x1", cache_dir=cache, progress=False) == [
        "organism, being",
        "benthos",
        "heterotroph",
    ]
    assert zoo.label_names("imagenet21k", cache_dir=cache, progress=False)[-1] == "heterotroph"
    assert http_server.counts["/data/imagenet_class_index.json"] == 1
    assert http_server.counts["/bit_models/imagenet21k_wordnet_lemmas.txt"] == 1
    assert os.path.exists(download.cached_path(zoo.LABEL_SOURCES["imagenet1k"], cache))


@pytest.mark.parametrize("unknown", ["imagenet22k", "R50x1", "BiT-X-R50x1"])
def test_label_names_unknown_source(unknown, tmp_path):
    with pytest.raises(ValueError, match="imagenet1k"):
        zoo.label_names(unknown, cache_dir=str(tmp_path), progress=False)
    assert not any(tmp_path.iterdir())


def test_messages_name_python_arguments_in_python_and_flags_on_the_command_line(small_npz, tmp_path, monkeypatch):
    """`label_names` offline says `labels=FILE` to a Python caller and `--labels FILE` inside the command line."""
    url = "http://127.0.0.1:1/data/imagenet_class_index.json"  # nothing listens on port 1
    monkeypatch.setitem(zoo.LABEL_SOURCES, "imagenet1k", url)
    cache = str(tmp_path / "cache")
    rest = f", or put the file at {download.cached_path(url, cache)} (the cache: $BIT_KERAS_CACHE)"
    for command_line, labels in ((False, "labels=FILE"), (True, "--labels FILE")):
        with checks.command_line() if command_line else contextlib.nullcontext():
            with pytest.raises(bit_keras.DownloadError) as info:
                bit_keras.label_names("BiT-S-R50x1", cache_dir=cache, progress=False)
            assert str(info.value).endswith(f"; the label names of BiT-S-R50x1: pass {labels}{rest}")
            with pytest.raises(ValueError, match=f"no checkpoint head: pass {'--' * command_line}num_classes "):
                zoo.create_model("R26x0.5")
            with pytest.raises(ValueError, match=f"already: leave {'--' * command_line}weights out$"):
                zoo.create_model(small_npz, weights=small_npz)


def test_label_files_must_be_utf8_text(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"cat\r\ndog\rbird\n\n")
    assert zoo.read_labels(str(path)) == ["cat", "dog", "bird"]
    path.write_bytes(b"cat\n\xff\n")
    with pytest.raises(ValueError, match=f"^{path}: class names must be UTF-8 text \\(byte 4 is not\\)$"):
        zoo.read_labels(str(path))
