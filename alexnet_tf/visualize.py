"""Pictures of a training run: conv1 filters, augmented inputs, error curves (PNG files).

    python -m alexnet_tf.visualize filters --workdir=runs/fashion_mnist
    python -m alexnet_tf.visualize augmentations --workdir=runs/fashion_mnist
    python -m alexnet_tf.visualize curves --workdir=runs/fashion_mnist

Each writes `<workdir>/<command>.png` (or --output) and prints the path. The functions below
(`filter_grid`, `augmentation_grid`, `plot_curves`) are what the commands and the notebook call.
"""

import csv
import os

import numpy as np

from alexnet_tf.rundir import RunDir, RunDirError

COMMANDS = ("filters", "augmentations", "curves")


class VisualizeError(ValueError):
    """A run directory that lacks what a picture needs."""


def _tile(images, rows, cols, pad=1, fill=255):
    """[N, h, w, C] uint8 -> one [rows*(h+pad)+pad, cols*(w+pad)+pad, C] mosaic, row-major."""
    n, h, w, c = images.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, np.uint8)
    for i in range(min(n, rows * cols)):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[top : top + h, left : left + w] = images[i]
    return canvas


def _upscale(image, factor):
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def filter_grid(kernel, groups=1, scale=None):
    """The paper's Figure 3: conv1 kernels [kh, kw, C, N] as an image grid, one panel per tower.

    Each kernel is scaled on its own to [0, 255] (contrast stretching, as such figures are drawn);
    with groups=2 the first and second halves of the kernels (the two GPUs' towers, paper §3.2)
    are drawn as two panels side by side.

    Args:
        kernel: conv1's kernel, [kh, kw, channels, filters]; 1 or 3 channels.
        groups: panels to split the filters into.
        scale: pixels per kernel element; default makes each kernel about 33 pixels wide.

    Returns:
        uint8 [H, W, 3] image.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4 or kernel.shape[2] not in (1, 3):
        raise VisualizeError(f"conv1 kernel of shape {kernel.shape}: expected [kh, kw, 1|3, N]")
    kernels = kernel.transpose(3, 0, 1, 2)  # [N, kh, kw, C]
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    high = kernels.max(axis=(1, 2, 3), keepdims=True)
    kernels = np.round(255 * (kernels - low) / np.maximum(high - low, 1e-12)).astype(np.uint8)
    if kernels.shape[-1] == 1:
        kernels = np.repeat(kernels, 3, axis=-1)
    scale = scale or max(1, round(33 / kernel.shape[0]))
    kernels = np.stack([_upscale(k, scale) for k in kernels])
    panels = []
    for part in np.split(kernels, groups):
        cols = int(np.ceil(np.sqrt(len(part) * 4 / 3)))  # a landscape panel, 48 -> 6 x 8
        rows = int(np.ceil(len(part) / cols))
        panels.append(_tile(part, rows, cols, pad=2))
    gap = np.full((panels[0].shape[0], 12, 3), 255, np.uint8)
    return np.concatenate([p if i == 0 else np.concatenate([gap, p], 1)
                           for i, p in enumerate(panels)], axis=1)


def augmentation_grid(images, preprocess, cols=8, scale=None):
    """A batch of training-pipeline outputs (normalised) as an image grid in RGB.

    Args:
        images: [N, H, W, C] model inputs, as the training pipeline yields them.
        preprocess: the run's `PreprocessConfig` (to undo the normalisation).
        cols: images per row.
        scale: upscaling factor; default makes small images about 84 pixels wide.
    """
    from alexnet_tf import preprocessing

    rgb = np.asarray(preprocessing.denormalize(np.asarray(images, np.float32), preprocess))
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    scale = scale or max(1, 84 // rgb.shape[1])
    rgb = np.stack([_upscale(image, scale) for image in rgb])
    return _tile(rgb, int(np.ceil(len(rgb) / cols)), cols, pad=2)


def read_history(workdir):
    """The run's history.csv as {column: [float per epoch]}."""
    run = RunDir(workdir)
    path = _existing(run, run.history)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise VisualizeError(f"{path} has no epochs yet")
    return {key: [float(row[key]) for row in rows] for key in rows[0] if key}


def plot_curves(history, path):
    """Train and validation top-1/top-5 error per epoch (the paper reports errors) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    epochs = np.asarray(history["epoch"]) + 1
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("top1", "-"), ("top5", "--")):
        for prefix, color in (("", "tab:blue"), ("val_", "tab:orange")):
            if prefix + key in history:
                label = f"{'validation' if prefix else 'train'} {key.replace('top', 'top-')} error"
                ax.plot(epochs, 1 - np.asarray(history[prefix + key]), style, color=color,
                        marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("error")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_png(image, path):
    import tensorflow as tf

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(image))
    return path


def _existing(run, path):
    """`path`, one of the run's files, which must exist."""
    try:
        return run.existing(path)
    except RunDirError as e:
        raise VisualizeError(str(e)) from None


def draw(command, workdir, output=None, checkpoint="best", count=32):
    """Writes the picture `command` ("filters", "augmentations", "curves") of a run; returns path."""
    if command not in COMMANDS:
        raise VisualizeError(f"unknown picture {command!r}; choose one of {COMMANDS}")
    output = output or os.path.join(workdir, f"{command}.png")
    if command == "curves":
        return plot_curves(read_history(workdir), output)

    from alexnet_tf import data

    run = RunDir(workdir)
    try:
        pre = run.preprocess()
    except RunDirError as e:
        raise VisualizeError(str(e)) from None
    if command == "filters":
        import keras

        model = keras.models.load_model(
            _existing(run, run.checkpoint(checkpoint)), compile=False)
        # The paper variant's two towers split conv1's 96 kernels 48 / 48 (paper Figure 3).
        groups = 2 if model.get_layer("conv2").groups == 2 else 1
        return write_png(filter_grid(model.get_layer("conv1").kernel.numpy(), groups), output)

    # Repeated, so that a split of fewer than `count` images still fills the grid, once it is
    # known to hold one.
    try:
        options = data.Options(seed=run.train_config().seed or 0, shuffle_buffer=1000,
                               repeat=True)
        dataset, _ = run.dataset("train", True, count, options, "an augmentations grid", pre)
    except RunDirError as e:
        raise VisualizeError(str(e)) from None
    images, _ = next(iter(data.on_host(dataset, pre, True, options)))
    return write_png(augmentation_grid(images.numpy(), pre), output)


def define_flags():
    """The flags of `python -m alexnet_tf.visualize`."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run directory (train.py's --workdir).",
                        required=True)
    flags.DEFINE_string("output", None, "PNG path; default <workdir>/<picture>.png.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Checkpoint for `filters`.")
    flags.DEFINE_integer("count", 32, "Images in the `augmentations` grid.", lower_bound=1)


def main(argv):
    from absl import flags

    from alexnet_tf import cli, sources

    if len(argv) != 2:
        cli.exit_with_error("visualize", f"give one picture to draw: python -m "
                            f"alexnet_tf.visualize {{{'|'.join(COMMANDS)}}} --workdir=DIR")
    FLAGS = flags.FLAGS
    try:
        path = draw(argv[1], FLAGS.workdir, FLAGS.output, FLAGS.checkpoint, FLAGS.count)
    except (VisualizeError, sources.DataError, OSError) as e:
        cli.exit_with_error("visualize", e)
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    from alexnet_tf import cli

    define_flags()
    app.run(main, flags_parser=cli.flags_parser("visualize"))
