"""Few-shot linear evaluation: the closed form against numpy's least squares, a pretrained backbone against its
architecture's random initialization, and the command line's checks and report."""

import json

import numpy as np
import pytest

from bit_keras import cli
from bit_keras.training import fewshot


@pytest.mark.parametrize("rows", [200, 12])  # more examples than features (primal form), and fewer (dual form)
def test_closed_form_equals_least_squares(rows):
    """The classifier is the ridge solution of the whitened features (with the bias feature) onto targets in
    {-1, 1}: numpy.linalg.lstsq on the system stacked with sqrt(l2)·I gives the same weights within 1e-5."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 30)) * rng.uniform(0.1, 10, size=30) + rng.normal(size=30)
    y = np.arange(rows) % 4
    l2 = 2.0**10
    mean, std, w = fewshot.linear_classifier(x, y, 4, l2)
    np.testing.assert_allclose(std, x.std(0, keepdims=True) + 1e-5)
    design = np.pad((x - x.mean(0)) / (x.std(0) + 1e-5), ((0, 0), (0, 1)), constant_values=100.0)
    targets = 2.0 * np.eye(4)[y] - 1.0
    stacked = np.concatenate([design, np.sqrt(l2) * np.eye(design.shape[1])])
    expected = np.linalg.lstsq(stacked, np.concatenate([targets, np.zeros((design.shape[1], 4))]), rcond=None)[0]
    assert np.abs(w - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(mean, x.mean(0, keepdims=True))


def test_draw_takes_k_per_class_by_seed():
    y = np.repeat(np.arange(3), 10)
    x = np.arange(30.0)[:, None]
    a, b, c = (fewshot.draw(x, y, 4, seed, 3) for seed in (0, 0, 1))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert np.bincount(a[1]).tolist() == [4, 4, 4]
    assert np.bincount(fewshot.draw(x, y, 25, 0, 3)[1]).tolist() == [10, 10, 10]  # all of a class with fewer


def test_pretrained_features_beat_random_ones_on_the_digits(tmp_path):
    """The shipped model's 10-shot linear accuracy on the embedded digits is above its architecture's random
    initialization (same resolution, 3 seeds); the report is the JSON written."""
    out = tmp_path / "report.json"
    pretrained = fewshot.fewshot("BiT-R14x0.5-mnist5k", shots=(10,), out=str(out))
    random = fewshot.fewshot("R14x0.5", shots=(10,), resolution=32)
    assert json.loads(out.read_text()) == pretrained
    assert pretrained["resolution"] == 32 and len(pretrained["shots"]["10"]["accuracies"]) == 3
    assert pretrained["shots"]["10"]["mean"] > random["shots"]["10"]["mean"] + 0.1
    assert pretrained["shots"]["10"]["mean"] > 0.85


def test_command_line_checks_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        ("--shots", "5", "0"): "--shots must be a positive integer, got 0",
        ("--seeds", "-1"): "--seeds must be a positive integer, got -1",
        ("--l2", "nan"): "--l2 must be a positive finite number, got nan",
        ("--batch", "0"): "--batch must be a positive integer, got 0",
        ("--test_fraction", "0.5"): "--test_fraction applies to an image folder only",
    }
    for args, message in cases.items():
        assert cli.main(["fewshot", *args]) == 1
        assert capsys.readouterr().err.strip() == f"bit-keras fewshot: {message}", args
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine.json").write_text("mine")
    assert cli.main(["fewshot", "--out", "mine.json"]) == 1
    assert "mine.json exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "mine"
