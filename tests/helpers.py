"""Small real files written by the tests themselves: images, folder trees, TFRecords, IDX."""

import csv
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_image(height, width, seed=0, channels=3):
    """A uint8 image with smooth gradients plus noise, so that JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(yy * (c + 1) + xx * (3 - c)) % 256 for c in range(channels)], -1)
    return np.clip(base + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8)


def encode(image, fmt):
    if fmt == "png":
        return tf.io.encode_png(image).numpy()
    return tf.io.encode_jpeg(image, quality=95).numpy()


def write_folder_tree(root, classes=("cat", "dog"), per_class=3, size=(40, 50), fmt="jpeg"):
    paths = []
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, name, f"{name}_{i}.{'png' if fmt == 'png' else 'jpg'}")
            with open(path, "wb") as f:
                f.write(encode(smooth_image(*size, seed=10 * c + i), fmt))
            paths.append(path)
    return paths


def write_tfrecord(path, labels, size=(40, 50)):
    with tf.io.TFRecordWriter(path) as writer:
        for i, label in enumerate(labels):
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[encode(smooth_image(*size, seed=i), "jpeg")])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }))
            writer.write(example.SerializeToString())


def write_idx(directory, split_prefix, images, labels):
    """Writes images [N, H, W] and labels [N] as gzipped IDX files (the MNIST format)."""
    os.makedirs(directory, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(os.path.join(directory, f"{split_prefix}-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(os.path.join(directory, f"{split_prefix}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.astype(np.uint8).tobytes())


def tiny_idx(tmp_path, n=256):
    """Tiny Fashion-MNIST-format IDX files with a learnable pattern (class = bright stripe row)."""
    directory = tmp_path / "idx"
    if not directory.exists():
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label] = 250
        write_idx(directory, "train", images, labels)
        write_idx(directory, "t10k", images[:64], labels[:64])
    return f"fashion_mnist:{directory}"


def tiny_config(tmp_path, **overrides):
    fields = dict(dataset=tiny_idx(tmp_path), variant="cifar", lrn="tf_cifar10", init="keras",
                  batch_size=32, epochs=1, steps_per_epoch=2, eval_steps=1,
                  learning_rate=0.01, schedule="constant", seed=1)
    fields.update(overrides)
    from alexnet_tf import training

    return training.TrainConfig(**fields)


def run_train(args, cwd, env=None, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, **kwargs)


def history(workdir):
    with open(os.path.join(workdir, "history.csv")) as f:
        return list(csv.DictReader(f))


def assert_one_line_error(result, program, *fragments):
    """A CLI run that failed with exit 2 and one `<program>: error: ...` line, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error:"), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last
