"""Input pipeline throughput on ImageNet-sized JPEGs made from real photographs, and on the
same images prepared once by prepare.py (the paper's 256 x 256 form).

Writes a folder tree of ~500x375, ~100 KB JPEGs re-encoded from scikit-image's sample photographs
(several sizes and crops), prepares it with alexnet_tf.prepare (reporting its img/s and MB in and
out), then measures images/s (total and per core) and the process's CPU time per image of:
  decode-only           read + tf.io.decode_jpeg of the originals (libjpeg-turbo: the ceiling
                        of any pipeline that decodes them)
  decode+resize         read + decode + one bilinear resize to the crop size: the ceiling of any
                        pipeline that resamples each image on the fly
  train                 make_dataset(training=True) on the originals finished on the host
                        (data.on_host): fused decode+crop+resize, batching, then flip, PCA
                        lighting, normalisation
  train, uint8          make_dataset(training=True) alone, as train.py runs it: the host stops
                        at uint8 crops (flip, lighting and normalisation run on the device)
  naive-train           full decode -> resize to 256 -> Keras RandomCrop/RandomFlip on batches
  eval                  make_dataset(training=False) on the originals, normalised on the host
  prepared decode-only  read the prepared shards + parse + decode each whole 256 x 256 JPEG
  prepared train        make_dataset("prepared:DIR", training=True), as train.py runs it: a random
                        227 x 227 window decoded alone, uint8 batches, no resize
Example:
    pip install scikit-image && python benchmarks/input_pipeline.py --images=600
    python benchmarks/input_pipeline.py --images=600 --ablation   # what each stage costs
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

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

    from alexnet_tf import data, inputs, preprocessing, sources

    root = FLAGS.dir or tempfile.mkdtemp(prefix="alexnet_jpegs_")
    mean_bytes = common.make_jpegs(root, FLAGS.images)
    files = sorted(tf.io.gfile.glob(os.path.join(root, "train", "*", "*.jpg")))
    n = len(files)
    cores = os.cpu_count()
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(TensorFlow's default)")
    print(f"{n} JPEGs, mean {mean_bytes / 1024:.0f} KiB, in {root}; {cores} cores; "
          f"batch {FLAGS.batch_size}; TF_ENABLE_ONEDNN_OPTS={onednn}")
    prepared = common.prepare_once(root)
    autotune = tf.data.AUTOTUNE
    preprocess = preprocessing.PreprocessConfig()  # the paper's 227 crops of 256

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
                         [preprocess.image_size, preprocess.image_size]),
                     num_parallel_calls=autotune, deterministic=False)
                     .batch(FLAGS.batch_size).prefetch(autotune))
    crop, flip = keras.layers.RandomCrop(227, 227), keras.layers.RandomFlip("horizontal")
    naive = (paths
             .map(lambda p: tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
                                            [256, 256]), num_parallel_calls=autotune)
             .batch(FLAGS.batch_size)
             .map(lambda x: flip(crop(x, training=True), training=True), num_parallel_calls=autotune)
             .prefetch(autotune))
    photos = sources.Source(f"folder:{root}")
    train_uint8, _ = data.make_dataset(photos, "train", True, FLAGS.batch_size, preprocess,
                                       data.Options(repeat=True))
    train = data.on_host(train_uint8, preprocess, True)
    shards = tf.data.Dataset.from_tensor_slices(
        sorted(tf.io.gfile.glob(os.path.join(prepared, "train-*")))).repeat()
    prepared_decode = (
        shards.interleave(tf.data.TFRecordDataset, cycle_length=16, num_parallel_calls=autotune,
                          deterministic=False)
        .map(lambda r: tf.shape(tf.io.decode_jpeg(tf.io.parse_single_example(
            r, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})["image/encoded"],
            channels=3)), num_parallel_calls=autotune, deterministic=False)
        .batch(FLAGS.batch_size).prefetch(autotune))
    prepared_source = sources.Source(f"prepared:{prepared}")
    prepared_config = inputs.preprocess_config(prepared_source.info("train"))
    prepared_train, _ = data.make_dataset(prepared_source, "train", True, FLAGS.batch_size,
                                          prepared_config,
                                          data.Options(repeat=True))
    evaluation, _ = data.make_dataset(photos, "train", False, FLAGS.batch_size, preprocess,
                                      data.Options(repeat=True))
    evaluation = data.on_host(evaluation, preprocess, False)

    pipelines = [("decode-only", decode_only), ("decode+resize", decode_resize), ("train", train),
                 ("train, uint8", train_uint8), ("naive-train", naive), ("eval", evaluation),
                 ("prepared decode-only", prepared_decode), ("prepared train", prepared_train)]
    if FLAGS.ablation:
        seeds = tf.data.Dataset.random(seed=0, rerandomize_each_iteration=True).batch(2)
        encoded = tf.data.Dataset.zip(paths.map(tf.io.read_file, num_parallel_calls=autotune),
                                      seeds)

        def window_decode(x, s):
            # Where the window lies matters: rows below it are never decoded, rows above it are
            # Huffman-decoded and skipped (a window at the top of the image decodes faster).
            window = preprocessing.paper_window(tf.io.extract_jpeg_shape(x)[:2], s, preprocess)
            return tf.shape(tf.image.decode_and_crop_jpeg(x, tf.stack(window), channels=3))

        floor = paths.map(lambda p: tf.io.extract_jpeg_shape(tf.io.read_file(p)),
                          num_parallel_calls=autotune)
        window = encoded.map(window_decode, num_parallel_calls=autotune)
        paper = encoded.map(lambda x, s: preprocessing.paper_crop(x, s, preprocess, jpeg=True),
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
    prepared_rate = median["prepared train"]
    print(f"prepared train vs train (host does all): {prepared_rate / median['train']:.1f}x; "
          f"vs train, uint8: {prepared_rate / median['train, uint8']:.1f}x; "
          f"vs prepared decode-only: {prepared_rate / median['prepared decode-only']:.0%}")


if __name__ == "__main__":
    app.run(main)
