"""Pictures of detections: boxes with labels on an image, and a grid of true and predicted boxes as a PNG."""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bit_keras import files

MIN_SIDE = 256  # smaller images are upscaled (by an integer factor) to at least this shorter side, for legible labels
TRUE_COLOR, PREDICTED_COLOR = (0, 160, 0), (255, 64, 64)
PAD, LEGEND_HEIGHT = 8, 24  # the grid's spacing around cells, and the legend band at its top
SHOWN_SCORE = 0.5  # detections drawn (and printed by `bit-keras detect`) score at least this by default
LEGEND = f"green: true boxes, red: predicted with score >= {SHOWN_SCORE:g} (score)"
_MARGIN = 2  # between a label's text and the edge of its background


def draw_boxes(image, boxes, classes, class_names, scores=None, color=PREDICTED_COLOR, width=2):
    """`image` (uint8 [H, W, 3]) with `boxes` (normalized yxyx [N, 4]) outlined in `color`, each labelled "name"
    or "name score" on a filled background above the box (inside it at the top edge). An image with a shorter
    side under MIN_SIDE is first upscaled by an integer factor (nearest neighbour). Returns an RGB image."""
    picture = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    factor = math.ceil(MIN_SIDE / min(picture.size))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    size = np.array([picture.height, picture.width, picture.height, picture.width])
    pixels = np.round(np.asarray(boxes, np.float64).reshape(-1, 4) * size).astype(int)
    classes = np.asarray(classes).reshape(-1)
    for i, (top, left, bottom, right) in enumerate(pixels.tolist()):
        left, top = min(max(left, 0), picture.width - 1), min(max(top, 0), picture.height - 1)
        right, bottom = min(max(right - 1, left), picture.width - 1), min(max(bottom - 1, top), picture.height - 1)
        draw.rectangle([left, top, right, bottom], outline=color, width=width)

        label = class_names[int(classes[i])] + ("" if scores is None else f" {float(scores[i]):.2f}")
        text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), label, font=font)
        label_w, label_h = text_right - text_left + 2 * _MARGIN, text_bottom - text_top + 2 * _MARGIN
        x = max(0, min(left, picture.width - label_w))
        y = top - label_h if top >= label_h else top
        draw.rectangle([x, y, x + label_w - 1, y + label_h - 1], fill=color)
        draw.text((x + _MARGIN - text_left, y + _MARGIN - text_top), label, fill=(255, 255, 255), font=font)
    return picture


def save_png(image, path):
    """Write `image` as a PNG at `path` through a temporary file (`bit_keras.files.replacing`)."""
    with files.replacing(os.fspath(path), ".png") as tmp:
        image.save(tmp, format="PNG")


def save_detection_grid(examples, predictions, class_names, path, columns=4):
    """A PNG grid of `examples` ({"image", "boxes", "classes"}) with their true boxes in green and the parallel
    `predictions` ({"boxes", "scores", "classes"}) in red, under a one-line legend.

    Cells are as large as the largest drawn image; the grid is min(columns, len(examples)) cells wide:
    width = cols * cell_w + (cols + 1) * PAD, height = LEGEND_HEIGHT + rows * cell_h + (rows + 1) * PAD.
    """
    if not examples or len(examples) != len(predictions):
        raise ValueError(f"save_detection_grid: {len(examples)} examples and {len(predictions)} predictions")
    pictures = []
    for example, prediction in zip(examples, predictions):
        picture = draw_boxes(example["image"], example["boxes"], example["classes"], class_names, color=TRUE_COLOR)
        pictures.append(
            draw_boxes(
                np.asarray(picture),
                prediction["boxes"],
                prediction["classes"],
                class_names,
                scores=prediction["scores"],
                color=PREDICTED_COLOR,
            )
        )
    cell_w, cell_h = max(p.width for p in pictures), max(p.height for p in pictures)
    cols = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / cols)
    size = cols * cell_w + (cols + 1) * PAD, LEGEND_HEIGHT + rows * cell_h + (rows + 1) * PAD
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    draw.text((PAD, LEGEND_HEIGHT // 2), LEGEND, fill=(0, 0, 0), font=ImageFont.load_default(), anchor="lm")
    for i, picture in enumerate(pictures):
        row, col = divmod(i, cols)
        grid.paste(picture, (PAD + col * (cell_w + PAD), LEGEND_HEIGHT + PAD + row * (cell_h + PAD)))
    save_png(grid, path)
