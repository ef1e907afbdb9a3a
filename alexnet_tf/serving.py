"""Versioned SavedModel export for TF Serving: encoded images in, labels and scores out.

The signatures run the input pipeline's own evaluation functions (`preprocessing.eval_image`,
its batch form `eval_images` for `predict_images`, `preprocessing.ten_crop`), so a served model
sees the views evaluation saw, cut and resized alike; training's evaluation rounds them to uint8
before normalising (`data.make_dataset` hands the device uint8 crops), the signatures do not.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf
from absl import logging

from alexnet_tf import devices, model as model_lib, preprocessing
from alexnet_tf.image_bytes import checked, decode
from alexnet_tf.layers import standard_ops
from alexnet_tf.rundir import RunDir, RunDirError


class ExportError(RuntimeError):
    """A user-facing export problem (existing version, bad directory); one-line message."""


_CLAIM_PREFIX = ".claim-"


def next_version(base_dir):
    """1 + the largest integer version directory, or version claimed by an export in progress,
    under base_dir (1 when there is none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = []
    for name in os.listdir(base_dir):
        number = name[len(_CLAIM_PREFIX):] if name.startswith(_CLAIM_PREFIX) else name
        if number.isdigit():
            versions.append(int(number))
    return max(versions, default=0) + 1


def _claim(export_dir, version):
    """Creates `<export_dir>/.claim-<version>`, failing if it exists: O_EXCL makes the claim
    atomic, so of several exports at once exactly one gets each version. Returns its path or
    None when another export holds it."""
    path = os.path.join(export_dir, f"{_CLAIM_PREFIX}{version}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return path


def _claim_version(export_dir, version, overwrite):
    """(version, claim path) for this export: the next free version, or `version` itself."""
    if version is not None:
        claim = _claim(export_dir, version)
        if claim is None:
            raise ExportError(
                f"version {version} is being written by another export (or one that died left "
                f"{os.path.join(export_dir, _CLAIM_PREFIX + str(version))}: delete it if no "
                "export is running)")
        if os.path.exists(os.path.join(export_dir, str(version))) and not overwrite:
            os.remove(claim)
            raise ExportError(f"{os.path.join(export_dir, str(version))} already exists; pass "
                              "--overwrite or another --version")
        return version, claim
    while True:
        version = next_version(export_dir)
        claim = _claim(export_dir, version)
        if claim is None:
            continue  # another export claimed it first: look again
        if os.path.exists(os.path.join(export_dir, str(version))):
            os.remove(claim)  # finished and released between our look and our claim
            continue
        return version, claim


def _classify(model, images, class_names, top_k, ten_crop):
    """Model inputs [N, H, W, C] (or [N, 10, H, W, C]) -> the signature's output dict."""
    if ten_crop:
        probabilities = model_lib.crop_averaged_probabilities(model, images)
    else:
        probabilities = tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))
    scores, class_ids = tf.math.top_k(probabilities, k=top_k)
    return {
        "probabilities": probabilities,
        "classes": tf.gather(tf.constant(class_names), class_ids),
        "class_ids": class_ids,
        "scores": scores,
    }


def build_export_archive(model, class_names, preprocess, ten_crop=False, top_k=5):
    """A `keras.export.ExportArchive` with the `serving_default` and `predict_images` endpoints.

    `serving_default` takes JPEG or PNG bytes and refuses, with INVALID_ARGUMENT, other bytes and
    images that declare more than `preprocess.max_pixels` pixels, before decoding them.

    Args:
        model: a Keras AlexNet taking `preprocess.image_size` square images.
        class_names: label strings, index = class id.
        preprocess: the run's `preprocessing.PreprocessConfig`.
        ten_crop: average softmax over the paper's 10 crops inside the graph.
        top_k: how many classes/scores to return.
    """
    if len(class_names) != model.output_shape[-1]:
        raise ExportError(
            f"{len(class_names)} class names for a model with {model.output_shape[-1]} outputs")
    top_k = min(top_k, len(class_names))
    view = preprocessing.ten_crop if ten_crop else preprocessing.eval_image
    out_shape = [10] if ten_crop else []
    out_shape += [preprocess.image_size, preprocess.image_size, preprocess.channels]
    view_spec = tf.TensorSpec(out_shape, tf.float32)
    names = [str(name) for name in class_names]

    def serve_bytes(image_bytes):
        # Each image's header is checked first: a request of other bytes, or of an image over
        # preprocess.max_pixels, fails with INVALID_ARGUMENT before any memory goes to decoding.
        with tf.device(devices.decode_device(devices.DeviceFacts.of_this_machine())):
            images = tf.map_fn(
                lambda b: view(decode(checked(b, preprocess.max_pixels), preprocess.channels),
                               preprocess),
                image_bytes, fn_output_signature=view_spec)
        return _classify(model, images, names, top_k, ten_crop)

    def serve_images(images):
        # The images of a request share one shape: the centre view is cut from all at once.
        if ten_crop:
            images = tf.map_fn(lambda x: view(x, preprocess), images, fn_output_signature=view_spec)
        else:
            images = preprocessing.eval_images(images, preprocess)
        return _classify(model, images, names, top_k, ten_crop)

    archive = keras.export.ExportArchive()
    # No archive.track(model): the endpoints' variables are saved anyway, and tracking the model
    # as well stores every weight a second time (Keras 3.15 saves the Keras variables it tracks
    # and the TensorFlow variables the endpoints capture as separate objects).
    # Traced with TensorFlow's own LRN and MatMul ops, not the CPU-only fast paths the layers take
    # in this process (XLA-fused LRN, Eigen's SparseMatMul): standard ops only.
    with standard_ops():
        archive.add_endpoint(
            "serving_default", serve_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.add_endpoint(
            "predict_images", serve_images,
            input_signature=[tf.TensorSpec([None, None, None, preprocess.channels], tf.float32,
                                           name="images")])
    return archive


def load_run(workdir, checkpoint="best"):
    """(model, class_names, PreprocessConfig) of a training workdir."""
    run = RunDir(workdir)
    try:
        model = keras.models.load_model(run.existing(run.checkpoint(checkpoint)))
        return model, run.class_names(), run.preprocess()
    except RunDirError as e:
        raise ExportError(str(e)) from None


def write_version(export_dir, write, version=None, overwrite=False):
    """Fills a new version `<export_dir>/<version>/` with `write(directory)`, atomically, and
    returns its path.

    `write` fills a hidden temporary directory beside the versions, which is renamed into place
    only when complete, so a server watching export_dir never loads a half-written version, and
    a failed export leaves nothing behind. The version is claimed first (a hidden `.claim-<N>`
    file created atomically), so concurrent exports to one export_dir each get their own
    version, and an explicit `version` that another export is writing is refused.
    """
    if version is not None and int(version) < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    os.makedirs(export_dir, exist_ok=True)
    version, claim = _claim_version(export_dir, None if version is None else int(version),
                                    overwrite)
    final = os.path.join(export_dir, str(version))
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
        write(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.remove(claim)
    logging.info("Exported %s", final)
    return final


def write_class_names(path, class_names):
    """One class name a line, line i naming class id i."""
    with open(path, "w") as f:
        f.write("\n".join(str(name) for name in class_names) + "\n")


def export_saved_model(model, export_dir, class_names, preprocess, version=None, ten_crop=False,
                       overwrite=False, top_k=5):
    """Writes the SavedModel of `build_export_archive` as `<export_dir>/<version>/` (the next
    version by default), atomically (`write_version`), and returns its path."""
    archive = build_export_archive(model, class_names, preprocess, ten_crop=ten_crop, top_k=top_k)

    def write(directory):
        # Saving traces the endpoints' functions again (without this, the test for standard ops
        # finds XLA-compiled ones).
        with standard_ops():
            archive.write_out(directory, verbose=False)
        # Also readable without TensorFlow; TF Serving leaves assets.extra/ to its users.
        os.makedirs(os.path.join(directory, "assets.extra"))
        write_class_names(os.path.join(directory, "assets.extra", "class_names.txt"), class_names)

    return write_version(export_dir, write, version, overwrite)
