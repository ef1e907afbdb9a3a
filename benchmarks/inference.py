"""Inference throughput and latency of an exported AlexNet SavedModel, beside PyTorch.

Loads a SavedModel written by export.py (or, without --saved_model, exports an untrained model
of --variant to a temporary directory) and times its `predict_images` signature (float images in
[0, 255]; the in-graph evaluation preprocessing included) at each batch size: images/s and
per-batch latency p50/p99. With --torch, the same network in PyTorch (eval mode, no_grad,
model only) and, for a like-for-like ratio, the Keras model alone under `tf.function`.

    python benchmarks/inference.py --variant=paper --batch_sizes=1,32,128 --torch
    python benchmarks/inference.py --saved_model=exports/alexnet/1 --image_size=28 --channels=1
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_string("saved_model", None, "An exported version directory; default: export one.")
flags.DEFINE_string("variant", "paper", "Variant to export when --saved_model is not given.")
flags.DEFINE_list("batch_sizes", ["1", "32", "128"], "Batch sizes.")
flags.DEFINE_integer("image_size", 256, "Side of the synthetic input images (before the crop).")
flags.DEFINE_integer("channels", 3, "Channels of the input images.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed calls per batch size.")
flags.DEFINE_float("seconds", 10.0, "Timed seconds per batch size (at least 5 calls).")
flags.DEFINE_bool("torch", False, "Also time PyTorch and the bare Keras model.")
flags.DEFINE_integer("threads", 0, "Intra-op threads for PyTorch (0: one per core).")
FLAGS = flags.FLAGS


def summary(times, batch_size):
    import numpy as np

    times = np.asarray(times)
    return (batch_size * len(times) / times.sum(), 1000 * np.percentile(times, 50),
            1000 * np.percentile(times, 99))


def export_untrained(variant, directory):
    import alexnet_tf
    from alexnet_tf import preprocessing, serving
    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    model = alexnet_tf.AlexNet(variant=variant)
    size = DEFAULT_IMAGE_SIZE[variant]
    preprocess = preprocessing.PreprocessConfig(image_size=size,
                                            resize_size=preprocessing.resize_size_for(size))
    path = serving.export_saved_model(model, directory, [str(i) for i in range(1000)], preprocess,
                                      version=1)
    return path, model


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    threads = FLAGS.threads or os.cpu_count()
    model = None
    with tempfile.TemporaryDirectory() as tmp:
        path = FLAGS.saved_model
        if path is None:
            path, model = export_untrained(FLAGS.variant, os.path.join(tmp, "alexnet"))
        predict = tf.saved_model.load(path).signatures["predict_images"]
        print(f"SavedModel {path if FLAGS.saved_model else f'(untrained {FLAGS.variant})'}; "
              f"TensorFlow {tf.__version__}; {os.cpu_count()} CPU cores; "
              f"{len(tf.config.list_physical_devices('GPU'))} GPU(s)", flush=True)
        header = "| batch | SavedModel img/s | p50 ms | p99 ms |"
        if FLAGS.torch:
            header += " Keras model img/s | PyTorch img/s | Keras / PyTorch |"
        print(header)
        print("|---|---|---|---|" + ("---|---|---|" if FLAGS.torch else ""), flush=True)
        for batch_size in (int(b) for b in FLAGS.batch_sizes):
            images = tf.constant(np.random.default_rng(0).uniform(
                0, 255, (batch_size, FLAGS.image_size, FLAGS.image_size, FLAGS.channels)),
                tf.float32)
            served = common.latencies(lambda: predict(images=images)["scores"].numpy(),
                                      FLAGS.warmup_steps, FLAGS.seconds)
            rate, p50, p99 = summary(served, batch_size)
            row = f"| {batch_size} | {rate:.1f} | {p50:.1f} | {p99:.1f} |"
            if FLAGS.torch and model is not None:
                size = model.input_shape[1]
                crops = images[:, :size, :size]
                forward = tf.function(lambda x: model(x, training=False))
                keras_rate, _, _ = summary(common.latencies(lambda: forward(crops).numpy(),
                                                            FLAGS.warmup_steps, FLAGS.seconds),
                                           batch_size)
                torch_rate, _, _ = summary(common.torch_inference_latencies(
                    FLAGS.variant, batch_size, size, 10, FLAGS.warmup_steps, threads), batch_size)
                row += f" {keras_rate:.1f} | {torch_rate:.1f} | {keras_rate / torch_rate:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    app.run(main)
