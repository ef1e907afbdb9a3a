"""Pictures: the filter grid and augmentation grid are checked pixel by pixel; the CLI end to end."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import preprocessing, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_filter_grid_draws_two_towers_side_by_side():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(11, 11, 3, 96)).astype(np.float32)
    grid = visualize.filter_grid(kernel, groups=2, scale=3)
    cell = 11 * 3 + 2  # kernel pixels plus padding
    panel_width = 8 * cell + 2  # 48 kernels as 6 rows x 8 columns
    assert grid.shape == (6 * cell + 2, 2 * panel_width + 12, 3)

    def expected(i):  # min-max stretched kernel i, upscaled 3x, computed independently
        k = kernel[..., i]
        k = np.round(255 * (k - k.min()) / (k.max() - k.min())).astype(np.uint8)
        return np.kron(k.transpose(2, 0, 1), np.ones((3, 3), np.uint8)).transpose(1, 2, 0)

    np.testing.assert_array_equal(grid[2 : 2 + 33, 2 : 2 + 33], expected(0))
    # Kernel 9 is row 1, column 1 of the first tower; kernel 48 opens the second tower's panel.
    np.testing.assert_array_equal(grid[2 + cell : 2 + cell + 33, 2 + cell : 2 + cell + 33],
                                  expected(9))
    left = panel_width + 12 + 2
    np.testing.assert_array_equal(grid[2 : 2 + 33, left : left + 33], expected(48))


def test_filter_grid_rejects_a_non_image_kernel():
    with pytest.raises(visualize.VisualizeError, match="expected"):
        visualize.filter_grid(np.zeros((5, 5, 64, 64)))


def test_augmentation_grid_undoes_the_normalisation():
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 100, 200)])
    images[..., 0] = 50  # distinguishes RGB from BGR
    config = preprocessing.PreprocessConfig(image_size=4, resize_size=4, mean=(104.0, 117.0, 123.0),
                                            std=(2.0, 3.0, 4.0), bgr=True)
    normalised = preprocessing.normalize(images, config).numpy()
    grid = visualize.augmentation_grid(normalised, config, cols=2, scale=1)
    assert grid.shape == (2 * 6 + 2, 2 * 6 + 2, 3)
    np.testing.assert_array_equal(grid[2:6, 2:6], images[0])
    np.testing.assert_array_equal(grid[2:6, 8:12], images[1])
    np.testing.assert_array_equal(grid[8:12, 2:6], images[2])


def run_visualize(*args):
    return subprocess.run([sys.executable, "-m", "alexnet_tf.visualize", *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.slow
def test_cli_draws_every_picture_of_a_run(tiny_run):
    workdir = tiny_run
    for command in visualize.COMMANDS:
        result = run_visualize(command, f"--workdir={workdir}", "--count=8")
        assert result.returncode == 0, result.stderr[-2000:]
        path = os.path.join(workdir, f"{command}.png")
        assert result.stdout.strip() == f"wrote {path}"
        image = tf.io.decode_png(tf.io.read_file(path)).numpy()
        assert image.ndim == 3 and min(image.shape[:2]) > 50
        assert image.std() > 1  # not a blank canvas
    # The tiny run's conv1 has 64 one-channel 5x5 kernels: one panel of 10 x 7 cells of 7x7 + 2.
    filters = tf.io.decode_png(tf.io.read_file(os.path.join(workdir, "filters.png")))
    assert filters.shape[:2] == (7 * (5 * 7 + 2) + 2, 10 * (5 * 7 + 2) + 2)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    result = run_visualize("curves", f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("visualize: error:")
    assert "history.csv not found" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_visualize("histogram", f"--workdir={tmp_path}")
    assert result.returncode == 2 and "unknown picture" in result.stderr
