"""Small real files written by the tests themselves: images, folder trees, TFRecords, IDX."""

import csv
import gzip
import importlib
import os
import struct
import subprocess
import sys
import tempfile
import threading
import zlib

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the README's second command installs for the tests: a missing one fails the test that
# needs it, naming it and this command, rather than skipping it.
DEBIAN_INSTALL = "$(command -v sudo) apt-get install -y {}"
PIP_INSTALL = "pip install -e '.[test]'"


def require(module):
    """`module`, imported; the test fails, naming it and the command that installs it, where it
    is missing (the test extra holds every Python package the tests use)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"needs {module} ({e}): {PIP_INSTALL} installs it", pytrace=False)


def require_fashion_mnist():
    """The test fails, naming the package and the command that installs it, where Debian's
    dataset-fashion-mnist (the real IDX files) is not installed."""
    from alexnet_tf import sources

    path = os.path.join(sources.IDX_DIRS["fashion_mnist"], "t10k-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        pytest.fail(f"needs Debian's dataset-fashion-mnist ({path} is missing): "
                    f"{DEBIAN_INSTALL.format('dataset-fashion-mnist')}", pytrace=False)


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


def png_bomb(width, height):
    """A valid PNG of width x height black grey pixels, a few hundred KB for 20000 x 20000:
    zlib shrinks its 400 MB of rows ~1000-fold (a decompression bomb)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter type 0, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def jpeg_bomb(width, height):
    """A 16 x 16 JPEG whose frame header (SOF0) is changed to declare width x height."""
    data = bytearray(encode(smooth_image(16, 16), "jpeg"))
    sof = data.index(b"\xff\xc0")  # length (2 bytes), precision (1), then height and width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def photo_jpeg(height, width):
    """matplotlib's sample photograph (Grace Hopper, 600 x 512) resized to height x width, as JPEG."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = tf.io.decode_jpeg(f.read())
    resized = tf.image.resize(photo, [height, width])
    return tf.io.encode_jpeg(tf.cast(tf.round(resized), tf.uint8), quality=90).numpy()


def photo_framings(height=300, width=400):
    """Six framings of matplotlib's photograph (face, uniform, background, all of it, mirrored),
    each resized to height x width: float32 [6, height, width, 3] in [0, 255]."""
    photo = tf.io.decode_jpeg(photo_jpeg(600, 512)).numpy()
    windows = [photo[:300, :256], photo[100:400, 128:384], photo[300:, :256], photo[300:, 256:],
               photo[:200, 300:], photo[:, ::-1]]
    return np.stack([tf.image.resize(w, [height, width]).numpy()
                     for w in windows]).astype(np.float32)


def recentre_classifier(model, views, sharpness=200):
    """Makes an untrained AlexNet decisive on `views` (its inputs): such a network gives every
    image nearly the same logits, so fc8 becomes sharpness x (logits - their mean over the
    views), and each view gets a clear top class of its own."""
    mean_logits = model.predict(views, verbose=0).mean(0)
    kernel, bias = model.get_layer("fc8").get_weights()
    model.get_layer("fc8").set_weights([sharpness * kernel, sharpness * (bias - mean_logits)])


def decisive_photo_export(variant, config, sharpness, directory):
    """A seeded untrained `variant` made decisive on the photographs (`photo_framings`, cut as
    `config` cuts them for evaluation; `recentre_classifier` with `sharpness`) and exported as a
    SavedModel in `directory`: (model, the views, the class names, the export's path, its
    predict_images probabilities on the photographs)."""
    import keras

    import alexnet_tf
    from alexnet_tf import preprocessing, serving

    photographs = photo_framings()
    keras.utils.set_random_seed(3)
    model = alexnet_tf.AlexNet(variant=variant)
    views = preprocessing.eval_images(photographs, config).numpy()
    recentre_classifier(model, views, sharpness=sharpness)
    names = [f"class{i}" for i in range(1000)]
    saved = serving.export_saved_model(model, str(directory), names, config)
    expected = tf.saved_model.load(saved).signatures["predict_images"](
        images=tf.constant(photographs))["probabilities"].numpy()
    return model, views, names, saved, expected


def run_measured(args, env=None, timeout=300):
    """Runs a command to its end; (exit status, stdout, stderr, the process's peak resident
    memory in MB), the peak from the kernel's accounting of that one process (wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss / 1024


LOADER_SOURCE = os.path.join(ROOT, "tests", "native", "load_saved_model.cc")


def build_c_loader(binary):
    """Builds tests/native/load_saved_model.cc (a SavedModel loaded as TF Serving loads it)
    against this TensorFlow wheel's C API, at `binary`; returns its path. RuntimeError without
    a C++ compiler (Debian's g++), naming the command that installs it."""
    import shutil

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError(f"needs a C++ compiler: {DEBIAN_INSTALL.format('g++')}")
    tf_dir = os.path.dirname(tf.__file__)
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-o", binary, LOADER_SOURCE,
         f"-I{os.path.join(tf_dir, 'include')}", os.path.join(tf_dir, "libtensorflow_cc.so.2"),
         os.path.join(tf_dir, "libtensorflow_framework.so.2"), f"-Wl,-rpath,{tf_dir}"],
        check=True, capture_output=True, text=True)
    return binary


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
                  learning_rate=0.01, schedule="constant", seed=1, backup_every_minutes=0)
    fields.update(overrides)
    from alexnet_tf import train_config

    return train_config.TrainConfig(**fields)


def settled_inputs(tmp_path, dataset, **overrides):
    """inputs.prepare_inputs of a paper-variant run of `dataset` with --pca=dataset in
    tmp_path/run: (its Inputs, its RunDir)."""
    from alexnet_tf import inputs
    from alexnet_tf.rundir import RunDir

    config = tiny_config(tmp_path, dataset=dataset, variant="paper", pca="dataset", **overrides)
    run = RunDir(str(tmp_path / "run"))
    run.create()
    return inputs.prepare_inputs(config, run), run


def pixel_eigenvalues(jpeg_paths):
    """The reference of --pca=dataset: eigenvalues, largest first, of the RGB covariance of
    every pixel of these JPEG files scaled to [0, 1], computed in numpy."""
    pixels = np.concatenate([tf.io.decode_jpeg(open(p, "rb").read()).numpy().reshape(-1, 3)
                             for p in jpeg_paths]) / 255.0
    return np.sort(np.linalg.eigvalsh(np.cov(pixels, rowvar=False)))[::-1]


def run_train(args, cwd, env=None, **kwargs):
    """train.py with `args`; a backup at every epoch end unless they say otherwise (the tests
    check resuming from those; test_backup checks the time rule of the default)."""
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    if not any(a.startswith("--backup_every_minutes") for a in args):
        args = [*args, "--backup_every_minutes=0"]
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
