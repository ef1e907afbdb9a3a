"""Runs every variant through training, evaluation, prediction and export in a fresh process.

    TF_ENABLE_ONEDNN_OPTS=0 python tests/portability_worker.py OUT_DIR

test_portability.py starts it once per oneDNN setting: TensorFlow reads the setting once, at
start-up, and picks different CPU kernels (and Grappler fusions) with it on and off. Writes
OUT_DIR/report.json: the oneDNN state TensorFlow reports, each variant's losses, and for the
paper, one_weird_trick and cifar runs the export path and serving_default's probabilities on
OUT_DIR/images/*.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.util import _pywrap_util_port  # noqa: E402

import alexnet_tf  # noqa: E402
from alexnet_tf import serving, train_config, training  # noqa: E402
from tests.helpers import encode, smooth_image, write_folder_tree, write_idx  # noqa: E402


def every_variant_trains_and_predicts():
    """One fit step, evaluate and predict of each variant at its design size."""
    losses = {}
    for variant in alexnet_tf.VARIANTS:
        model = alexnet_tf.AlexNet(4, variant=variant, init="keras")
        model.compile(keras.optimizers.SGD(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).uniform(-1, 1, (2, *model.input_shape[1:])).astype("float32")
        y = np.array([0, 3])
        history = model.fit(x, y, epochs=1, batch_size=2, verbose=0)
        evaluated = model.evaluate(x, y, verbose=0)
        predicted = model.predict(x, verbose=0)
        assert predicted.shape == (2, 4) and np.isfinite(predicted).all(), variant
        losses[variant] = [float(history.history["loss"][0]), float(evaluated)]
    return losses


def native_grouped_conv():
    """"trained", or the error of the paper model with one grouped convolution per layer."""
    try:
        model = alexnet_tf.AlexNet(4, variant="paper", init="keras",
                                   grouped_conv_implementation="native")
    except ValueError as e:
        return str(e)
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.zeros((2, 227, 227, 3), "float32"), np.array([0, 1]), verbose=0)
    return "trained"


def train_and_export(config, workdir, export_base, images):
    """train_and_evaluate, then export the run and serve the images through Python."""
    training.train_and_evaluate(config, workdir)
    model, class_names, pre = serving.load_run(workdir, "last")
    path = serving.export_saved_model(model, export_base, class_names, pre)
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    return {"export": path, "probabilities": out["probabilities"].numpy().tolist(),
            "class_ids": out["class_ids"].numpy().tolist()}


def main(out_dir):
    keras.utils.set_random_seed(0)
    report = {"onednn": bool(_pywrap_util_port.IsMklEnabled()),
              "gpu": bool(tf.config.list_physical_devices("GPU")),
              "variants": every_variant_trains_and_predicts(),
              "native": native_grouped_conv()}

    # Real encoded images for serving: JPEG photos-like gradients and a PNG.
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    rgb = []
    for i, (size, fmt) in enumerate([((300, 240), "jpeg"), ((180, 260), "jpeg"),
                                     ((240, 240), "png")]):
        path = os.path.join(images_dir, f"rgb{i}.{'png' if fmt == 'png' else 'jpg'}")
        with open(path, "wb") as f:
            f.write(encode(smooth_image(*size, seed=i), fmt))
        rgb.append(path)
    report["rgb_images"] = rgb

    # The paper variant (grouped conv2/4/5, LRN) through the whole library path.
    folder = os.path.join(out_dir, "folder")
    write_folder_tree(os.path.join(folder, "train"), ("cat", "dog", "emu"), per_class=4,
                      size=(64, 80))
    write_folder_tree(os.path.join(folder, "val"), ("cat", "dog", "emu"), per_class=2,
                      size=(64, 80))
    paper = train_config.TrainConfig(
        dataset=f"folder:{folder}", variant="paper", init="keras", batch_size=4, epochs=1,
        steps_per_epoch=2, eval_steps=1, schedule="constant", seed=1, pca="imagenet")
    report["paper"] = train_and_export(
        paper, os.path.join(out_dir, "run_paper"), os.path.join(out_dir, "exports", "paper"),
        [open(p, "rb").read() for p in rgb])

    # The other shipped ImageNet variant (one tower, no LRN) through the same path.
    report["one_weird_trick"] = train_and_export(
        dataclasses.replace(paper, variant="one_weird_trick"),
        os.path.join(out_dir, "run_one_weird_trick"),
        os.path.join(out_dir, "exports", "one_weird_trick"), [open(p, "rb").read() for p in rgb])

    # The small variant on one-channel images, as in the README's main command.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 96)
    write_idx(os.path.join(out_dir, "idx"), "train", rng.integers(0, 255, (96, 28, 28)), labels)
    write_idx(os.path.join(out_dir, "idx"), "t10k", rng.integers(0, 255, (32, 28, 28)),
              labels[:32])
    gray = []
    for i in range(2):
        path = os.path.join(images_dir, f"gray{i}.png")
        with open(path, "wb") as f:
            f.write(encode(smooth_image(28 + 8 * i, 28, seed=i, channels=1), "png"))
        gray.append(path)
    report["gray_images"] = gray
    cifar = train_config.TrainConfig(
        dataset=f"fashion_mnist:{os.path.join(out_dir, 'idx')}", variant="cifar",
        lrn="tf_cifar10", init="keras", batch_size=16, epochs=1, steps_per_epoch=2,
        eval_steps=1, schedule="constant", seed=1)
    report["cifar"] = train_and_export(
        cifar, os.path.join(out_dir, "run_cifar"), os.path.join(out_dir, "exports", "cifar"),
        [open(p, "rb").read() for p in gray])

    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
