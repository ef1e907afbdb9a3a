"""Input pipeline throughput on ImageNet-sized JPEGs made from real photographs.

Writes a folder tree of ~500x375, ~100 KB JPEGs re-encoded from scikit-image's sample photographs
(several sizes and crops), then measures images/s (total and per core) and the process's CPU time
per image of:
  decode-only   read + tf.io.decode_jpeg (libjpeg-turbo: the ceiling)
  decode+resize read + decode + one bilinear resize to the crop size: the ceiling of any
                pipeline that resamples each image on the fly (the paper's scheme does)
  train         alexnet_tf.data.make_dataset(training=True): fused decode+crop, flip, PCA
                lighting, normalisation, batching
  naive-train   full decode -> resize to 256 -> Keras RandomCrop/RandomFlip on batches
  eval          make_dataset(training=False): decode, shorter side 256, centre crop
Example:
    pip install scikit-image && python benchmarks/input_pipeline.py --images=600
    python benchmarks/input_pipeline.py --images=600 --ablation   # what each stage costs
"""

import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("images", 600, "JPEG files to generate.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("batches", 30, "Timed batches per measurement, after the first (the files "
                     "are repeated as often as needed).")
flags.DEFINE_integer("repeats", 3, "Measurements of each pipeline, interleaved; the median is "
                     "reported (this machine's speed drifts by up to ~1.6x within minutes).")
flags.DEFINE_bool("ablation", False, "Also measure parts of the training pipeline: tf.data's "
                  "own cost per image (read, JPEG header, batch), decoding paper_crop's random "
                  "window without resizing it, and paper_crop (window decode + resize), neither "
                  "augmented nor filtered.")
flags.DEFINE_string("dir", None, "Where to write the files (default: a temporary directory).")
FLAGS = flags.FLAGS

# Colour photographs bundled with scikit-image (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry")


def make_jpegs(root, count):
    import numpy as np
    import skimage.data
    import tensorflow as tf

    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]
    sizes = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        # A random crop of 60-100% of the photo, resized to an ImageNet-like 500x375 or 375x500.
        frac = rng.uniform(0.6, 1.0)
        ch, cw = int(h * frac), int(w * frac)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        target = (375, 500) if i % 3 else (500, 375)
        image = tf.image.resize(photo[top : top + ch, left : left + cw], target, antialias=True)
        data = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=92)
        folder = os.path.join(root, "train", f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
            f.write(data.numpy())
        sizes.append(len(data.numpy()))
    return sum(sizes) / len(sizes)


def measure(ds, batch_size):
    """Steady-state (images/s, CPU ms per image) of a repeating pipeline: FLAGS.batches batches
    timed on one iterator, after its first batch. CPU time is the whole process's (all threads):
    with every core busy it is what each image costs, whatever the machine's speed of the moment.

    One iterator per measurement, as in a training epoch: a new iterator pays start-up costs
    (threads, the first batch, instantiating each stage's functions) that passes over a few
    hundred files would count several times. Every pipeline runs with tf.data's autotuning off,
    as make_dataset's do (in TensorFlow 2.21 destroying an autotuned iterator waits for the
    autotuner's next wake-up)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    iterator = iter(ds.with_options(options))
    next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(FLAGS.batches):
        next(iterator)
    images = FLAGS.batches * batch_size
    return (images / (time.perf_counter() - start),
            1000 * (time.process_time() - cpu_start) / images)


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    from alexnet_tf import data, preprocessing

    root = FLAGS.dir or tempfile.mkdtemp(prefix="alexnet_jpegs_")
    mean_bytes = make_jpegs(root, FLAGS.images)
    files = sorted(tf.io.gfile.glob(os.path.join(root, "train", "*", "*.jpg")))
    n = len(files)
    cores = os.cpu_count()
    print(f"{n} JPEGs, mean {mean_bytes / 1024:.0f} KiB, in {root}; {cores} cores; "
          f"batch {FLAGS.batch_size}")
    autotune = tf.data.AUTOTUNE
    config = preprocessing.PreprocessConfig()  # the paper's 227 crops of 256

    paths = tf.data.Dataset.from_tensor_slices(files).repeat()
    decode_only = (paths
                   .map(lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
                        num_parallel_calls=autotune, deterministic=False)
                   .map(lambda x: tf.shape(x)).batch(FLAGS.batch_size).prefetch(autotune))
    # Resize cost grows with the output size: resizing the whole image to 227x227 costs what
    # resizing a random window to it does, and decoding a window costs what decoding it all does.
    decode_resize = (paths
                     .map(lambda p: tf.image.resize(
                         tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
                         [config.image_size, config.image_size]),
                     num_parallel_calls=autotune, deterministic=False)
                     .batch(FLAGS.batch_size).prefetch(autotune))
    crop, flip = keras.layers.RandomCrop(227, 227), keras.layers.RandomFlip("horizontal")
    naive = (paths
             .map(lambda p: tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
                                            [256, 256]), num_parallel_calls=autotune)
             .batch(FLAGS.batch_size)
             .map(lambda x: flip(crop(x, training=True), training=True), num_parallel_calls=autotune)
             .prefetch(autotune))
    train, _ = data.make_dataset(f"folder:{root}", "train", True, FLAGS.batch_size, config,
                                 repeat=True)
    evaluation, _ = data.make_dataset(f"folder:{root}", "train", False, FLAGS.batch_size, config,
                                      repeat=True)

    pipelines = [("decode-only", decode_only), ("decode+resize", decode_resize), ("train", train),
                 ("naive-train", naive), ("eval", evaluation)]
    if FLAGS.ablation:
        seeds = tf.data.Dataset.random(seed=0, rerandomize_each_iteration=True).batch(2)
        encoded = tf.data.Dataset.zip(paths.map(tf.io.read_file, num_parallel_calls=autotune),
                                      seeds)

        def window_decode(x, s):
            # Where the window lies matters: rows below it are never decoded, rows above it are
            # Huffman-decoded and skipped (a window at the top of the image decodes faster).
            window = preprocessing.paper_window(tf.io.extract_jpeg_shape(x)[:2], s, config)
            return tf.shape(tf.image.decode_and_crop_jpeg(x, tf.stack(window), channels=3))

        floor = paths.map(lambda p: tf.io.extract_jpeg_shape(tf.io.read_file(p)),
                          num_parallel_calls=autotune)
        window = encoded.map(window_decode, num_parallel_calls=autotune)
        paper = encoded.map(lambda x, s: preprocessing.paper_crop(x, s, config, jpeg=True),
                            num_parallel_calls=autotune)
        pipelines += [("ablation: read + JPEG header + batch", floor.batch(FLAGS.batch_size)),
                      ("ablation: decode paper_crop's window", window.batch(FLAGS.batch_size)),
                      ("ablation: paper_crop (window decode + resize)",
                       paper.batch(FLAGS.batch_size))]
    rates = {name: [] for name, _ in pipelines}
    for repeat in range(FLAGS.repeats):
        for name, ds in pipelines:
            rates[name].append(measure(ds, FLAGS.batch_size))
        print(f"repeat {repeat + 1}: " + ", ".join(
            f"{k} {v[-1][0]:.0f} img/s {v[-1][1]:.2f} ms" for k, v in rates.items()), flush=True)
    median = {name: float(np.median([r for r, _ in v])) for name, v in rates.items()}
    cpu = {name: float(np.median([c for _, c in v])) for name, v in rates.items()}
    print("| pipeline | img/s (median) | img/s/core | vs decode-only | CPU ms/img (median) "
          "| decode-only's CPU time / this |")
    print("|---|---|---|---|---|---|")
    for name, rate in median.items():
        print(f"| {name} | {rate:.0f} | {rate / cores:.0f} | {rate / median['decode-only']:.0%} "
              f"| {cpu[name]:.2f} | {cpu['decode-only'] / cpu[name]:.0%} |")


if __name__ == "__main__":
    app.run(main)
