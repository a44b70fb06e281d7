"""A new user's first runs: their own folder of photos of mixed sizes fine-tunes with no resolution flag, and a
Python script using bit_keras sees none of TensorFlow's start-up or retracing lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.test_cli import message_lines, run_in_process

pytestmark = pytest.mark.timeout(600)

SIZES = ((300, 400), (480, 640), (1000, 1500), (600, 450), (768, 1024))  # (height, width), portrait and landscape


def _photo(rng, size, hue):
    """A natural-looking picture: a smooth colour field (sky, ground), blurred shapes of the class's hue, sensor
    noise."""
    height, width = size
    field = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        radius = rng.integers(min(size) // 10, min(size) // 3)
        colour = tuple(int(c) for c in np.clip(np.array(hue) + rng.integers(-40, 40, 3), 0, 255))
        draw.ellipse([x - radius, y - radius // 2, x + radius, y + radius // 2], fill=colour)
    pixels = np.asarray(field.filter(ImageFilter.GaussianBlur(3)), np.float64)
    return Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))


def write_photos(root, per_class=5, seed=0):
    """3 classes of photos (JPEG and PNG), every class in several sizes from 300x400 to 1000x1500."""
    rng = np.random.default_rng(seed)
    for name, hue in (("apples", (200, 30, 30)), ("lakes", (30, 80, 200)), ("meadows", (40, 170, 40))):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            photo = _photo(rng, SIZES[i % len(SIZES)], hue)
            suffix = ".jpg" if i % 2 else ".png"
            photo.save(os.path.join(root, name, f"IMG_{i:04d}{suffix}"), quality=90)
    return str(root)


def test_a_folder_of_photos_of_mixed_sizes_fine_tunes_with_no_resolution_flag(tmp_path):
    """The HyperRule's resolution rule is about the images' size: it is decided from the headers the folder scan
    reads (the median-area training image: 480x640 here, so the rule for large images, 512/480), and said in the
    log."""
    photos = write_photos(tmp_path / "photos")
    args = ["finetune", "--image_folder", photos, "--model", "BiT-R14x0.5-mnist5k", "--steps", "5"]
    result = run_in_process([*args, "--logdir", tmp_path / "runs"])
    assert result.returncode == 0, result.stderr[-3000:]
    rule = (
        "BiT-HyperRule resolution: resize 512, crop 480, by the rule for images of 96x96 pixels or more: the "
        "median-area training image: 480x640 = 307,200 pixels"
    )
    run = tmp_path / "runs" / "photos-BiT-R14x0.5-mnist5k"
    with open(run / "train.log", encoding="utf-8") as f:
        log = f.read()
    assert rule in log and "test accuracy" in log.splitlines()[-1]
    assert json.loads((run / "metrics.json").read_text())["image_size"] == 480


def test_a_source_of_unknown_sizes_is_refused_naming_the_flag():
    """Only a source whose sizes are truly unknown is refused, and the line names --resolution on the command line
    (and resolution= in Python)."""
    from bit_keras import checks
    from bit_keras.training import hyperrule

    with pytest.raises(ValueError, match=r"image size of 'mine' is unknown; pass resolution=CROP"):
        hyperrule.resolution(dataset="mine")
    with checks.command_line(), pytest.raises(ValueError, match=r"unknown; pass --resolution CROP"):
        hyperrule.resolution(dataset="mine")


def test_python_use_prints_no_tensorflow_noise(tmp_path):
    """`import bit_keras`, then inference at several image sizes: nothing on stderr (no failed cuInit of a CPU host,
    no retracing warnings); BIT_KERAS_VERBOSE=1 lets TensorFlow's own lines through."""
    code = (
        "import numpy as np, bit_keras\n"
        "model = bit_keras.create_model('BiT-R14x0.5-mnist5k', weights='pretrained')\n"
        "for side in (32, 48, 64, 96, 128, 160):\n"
        "    model(np.zeros((1, side, side, 3), np.float32))\n"
        "    model.predict(np.zeros((2, side, side, 3), np.float32), verbose=0)\n"
        "print('done')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BIT_KERAS_VERBOSE")}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout == "done\n", quiet.stderr[-3000:]
    assert quiet.stderr == ""
    loud = subprocess.run(
        [sys.executable, "-c", code], env={**env, "BIT_KERAS_VERBOSE": "1"}, capture_output=True, text=True, timeout=300
    )
    assert loud.returncode == 0 and message_lines(loud.stderr) != loud.stderr.splitlines()  # TensorFlow's lines
