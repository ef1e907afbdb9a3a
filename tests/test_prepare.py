"""prepare.py and prepared: sources, on small folder trees the tests write: the shards and their
keys, resuming after SIGKILL, crops of prepared images against numpy slices, and a run trained on
prepared data served on the original JPEG bytes."""

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_tf import data, inputs, prepare, preprocessing, preprocessing_layers, sources
from alexnet_tf import train_config
from tests.helpers import (ROOT, assert_one_line_error, encode, photo_jpeg, smooth_image,
                           tiny_idx)

CLASSES = ("bird", "cat", "dog")
STANDARD_KEYS = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/text": tf.io.FixedLenFeature([], tf.string),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
}


def write_photos(root, per_class=4, sizes=((300, 400), (375, 500), (480, 320), (200, 260))):
    """A class-folder tree of JPEGs of several sizes and aspect ratios (one smaller than 256),
    with a tint per class; returns {relative path: label}."""
    files = {}
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            height, width = sizes[i % len(sizes)]
            image = smooth_image(height, width, seed=10 * label + i).astype(np.int32)
            image[..., label] = np.minimum(image[..., label] + 90, 255)  # the class's tint
            relative = os.path.join(name, f"{name}_{i}.jpg")
            with open(os.path.join(root, relative), "wb") as f:
                f.write(encode(image.astype(np.uint8), "jpeg"))
            files[relative] = label
    return files


def read_records(directory, split):
    description = sources.read_prepared(directory)
    paths = [os.path.join(directory, name) for name in description["splits"][split]["shards"]]
    return [tf.io.parse_single_example(r, STANDARD_KEYS) for r in tf.data.TFRecordDataset(paths)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(source folder, {relative path: label} of its readable images, prepared directory)."""
    root = tmp_path_factory.mktemp("prepare")
    source = root / "photos"  # photos/train/<class>/, photos/val/<class>/
    files = {os.path.join("train", name): label
             for name, label in write_photos(source / "train").items()}
    write_photos(source / "val", per_class=1)
    (source / "train" / "cat" / "truncated.jpg").write_bytes(photo_jpeg(300, 300)[:2000])
    (source / "train" / "dog" / "empty.jpg").write_bytes(b"")
    # Whole by its markers, but no JPEG inside: decoding raises.
    (source / "train" / "dog" / "garbled.jpg").write_bytes(
        b"\xff\xd8\xff" + b"garbage" * 20 + b"\xff\xd9")
    out = str(root / "prepared")
    prepare.prepare(f"folder:{source}", out, records_per_shard=3)
    return source, files, out


def test_shards_hold_every_readable_image_once_with_tensorflow_models_keys(prepared):
    source, files, out = prepared
    records = read_records(out, "train")
    filenames = [r["image/filename"].numpy().decode() for r in records]
    assert sorted(filenames) == sorted(files)
    for record in records:
        name = record["image/filename"].numpy().decode()
        label = int(record["image/class/label"])
        assert label == files[name]
        assert record["image/class/text"].numpy().decode() == CLASSES[label]
        assert record["image/format"].numpy() == b"JPEG"
        image = tf.io.decode_jpeg(record["image/encoded"]).numpy()
        assert image.shape == (256, 256, 3)
        assert (int(record["image/height"]), int(record["image/width"])) == (256, 256)
    description = sources.read_prepared(out)
    assert description["splits"]["train"]["records"] == len(files)
    assert description["splits"]["validation"]["records"] == len(CLASSES)
    assert description["class_names"] == list(CLASSES)
    # Folder trees list class by class; the shards must not.
    assert [files[f] for f in filenames] != sorted(files[f] for f in filenames)


def test_skipped_files_are_listed_with_their_reason(prepared):
    _, _, out = prepared
    skipped = sources.read_prepared(out)["splits"]["train"]["skipped"]
    assert sorted((os.path.basename(s["file"]), s["reason"]) for s in skipped) == [
        ("empty.jpg", "not a whole JPEG or PNG file"),
        ("garbled.jpg", "could not be decoded"),
        ("truncated.jpg", "not a whole JPEG or PNG file")]


def test_prepared_images_are_the_central_256_square_of_the_rescaled_image(prepared):
    # Reference: Pillow's antialiased bilinear resize of the shorter side to 256, then numpy's
    # central 256 x 256 slice. JPEG at quality 90 and two resamplers leave a few levels on these
    # noisy images; the same slice 2 pixels off-centre differs 2.5-3x more.
    source, _, out = prepared
    for record in read_records(out, "train"):
        original = Image.open(source / record["image/filename"].numpy().decode()).convert("RGB")
        scale = 256 / min(original.size)
        width, height = (max(256, round(s * scale)) for s in original.size)
        reference = np.asarray(original.resize((width, height), Image.BILINEAR), np.float64)
        image = tf.io.decode_jpeg(record["image/encoded"]).numpy().astype(np.float64)

        def error(shift):
            top, left = (height - 256) // 2, (width - 256) // 2
            top, left = (top + shift, left) if height > width else (top, left + shift)
            return np.abs(image - reference[top : top + 256, left : left + 256]).mean()

        assert error(0) < 5.0
        assert error(0) < 0.6 * error(2)


def test_pca_is_the_eigen_decomposition_of_all_training_pixels(prepared):
    # numpy's covariance of every pixel of the stored JPEGs, against the one the eigen-pairs give
    # back (V diag(eigval) V^T): prepare.py counts the pixels before JPEG encoding, which smooths
    # these noisy images' variance by a few per cent.
    _, _, out = prepared
    pixels = np.concatenate([
        tf.io.decode_jpeg(r["image/encoded"]).numpy().reshape(-1, 3) / 255.0
        for r in read_records(out, "train")])
    pca = sources.read_prepared(out)["pca"]
    assert pca["pixels"] == len(pixels)
    eigval, eigvec = np.asarray(pca["eigval"]), np.asarray(pca["eigvec"])
    assert np.all(np.diff(eigval) <= 0)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T,
                               np.cov(pixels, rowvar=False, bias=True), atol=0.004)


def test_keep_frame_keeps_the_whole_rescaled_frame(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "a" / "wide.jpg").write_bytes(encode(smooth_image(300, 500), "jpeg"))
    prepare.prepare(f"folder:{tmp_path / 'photos'}", str(tmp_path / "out"), keep_frame=True,
                    splits=("train",))
    record, = read_records(str(tmp_path / "out"), "train")
    assert (int(record["image/height"]), int(record["image/width"])) == (256, 427)
    assert tf.io.decode_jpeg(record["image/encoded"]).shape == (256, 427, 3)


def run_prepare(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_during_prepare_then_rerun_writes_every_record_exactly_once(tmp_path):
    names = sorted(os.path.join("train", name)
                   for name in write_photos(tmp_path / "photos" / "train", per_class=30))
    write_photos(tmp_path / "photos" / "val", per_class=1)
    out = tmp_path / "out"
    args = [f"--dataset=folder:{tmp_path / 'photos'}", f"--output_dir={out}",
            "--records_per_shard=4", "--splits=train"]
    process = run_prepare(args)
    deadline = time.monotonic() + 120
    while len(list(out.glob("train-*"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*")}
    assert 3 <= len(finished) < 90 // 4, "the kill came too late to test resuming"
    assert not (out / "dataset.json").exists()

    process = run_prepare(args)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "img/s" in stdout and "ETA" in stdout or "100%" in stdout
    # Shards finished before the kill are kept as they were.
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime
    counts = collections.Counter(r["image/filename"].numpy().decode()
                                 for r in read_records(str(out), "train"))
    assert counts == collections.Counter(names)
    assert not list(out.glob(".*.tmp"))


def test_resuming_with_other_settings_is_refused(tmp_path):
    (tmp_path / "photos" / "train" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "train" / "a" / "one.jpg").write_bytes(
        encode(smooth_image(300, 300), "jpeg"))
    source, out = f"folder:{tmp_path / 'photos'}", str(tmp_path / "out")
    prepare.prepare(source, out, splits=("train",))
    with pytest.raises(prepare.PrepareError, match="quality=90"):
        prepare.prepare(source, out, quality=75, splits=("train",))
    prepare.prepare(source, out, splits=("train",))  # the same settings: nothing to redo


def test_prepare_cli_refuses_bad_input_in_one_line(tmp_path):
    def prepare_py(dataset):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "prepare.py"), f"--dataset={dataset}",
             f"--output_dir={tmp_path / 'out'}"],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))

    assert_one_line_error(prepare_py(f"folder:{tmp_path / 'nope'}"), "prepare.py",
                          "no such directory")
    assert_one_line_error(prepare_py(tiny_idx(tmp_path)), "prepare.py", "needs no preparing")


# --------------------------------------------------------------------------------------------
# Crops of prepared images


def config_for(out):
    return inputs.preprocess_config(sources.Source(f"prepared:{out}").info("train"))


def stored_images(out):
    return {r["image/filename"].numpy().decode(): tf.io.decode_jpeg(r["image/encoded"]).numpy()
            for r in read_records(out, "train")}


def find_window(image, crop):
    """The (top, left) of every window of `image` equal to `crop`, but for the window's first and
    last columns: decoding a window alone (decode_and_crop_jpeg) upsamples chroma at its edges
    without the neighbouring column, so at some offsets those columns differ from a slice of
    the whole image by a few tens of levels."""
    size = crop.shape[0]
    inner = crop[:, 1:-1]
    return [(t, l) for t in range(image.shape[0] - size + 1)
            for l in range(image.shape[1] - size + 1)
            if np.array_equal(image[t : t + size, l + 1 : l + size - 1], inner)]


def prepared_batches(out, training, ten_crop=False, seed=0):
    """The uint8 crops of every record (training: of all but the last incomplete batch)."""
    ds, _ = data.make_dataset(f"prepared:{out}", "train", training, 4, config_for(out),
                              data.Options(seed=seed, ten_crop=ten_crop))
    return np.concatenate([x.numpy() for x, _ in ds])


def matched(crops, images, views):
    """Pairs each crop with the one image whose `views(image)` equal it exactly; asserts that
    every image is matched once."""
    pairs = []
    for crop in crops:
        found = [i for i, image in enumerate(images) if np.array_equal(views(image), crop)]
        assert len(found) == 1, "a crop is not the expected view of exactly one image"
        pairs.append(found[0])
    assert sorted(pairs) == list(range(len(images)))


def test_training_crops_are_exact_windows_inside_the_image(prepared):
    _, _, out = prepared
    images = list(stored_images(out).values())
    crops = prepared_batches(out, training=True)
    assert crops.dtype == np.uint8 and crops.shape[1:] == (227, 227, 3)
    offsets = set()
    for crop in crops:
        found = [w for image in images for w in find_window(image, crop)]
        assert found, "a training crop is not a window of any prepared image"
        offsets.update(found)
    assert len(offsets) > 3  # random windows, not one fixed place


def test_evaluation_crop_is_the_central_window(prepared):
    _, _, out = prepared
    images = list(stored_images(out).values())
    crops = prepared_batches(out, training=False)
    assert crops.shape == (len(images), 227, 227, 3)
    matched(crops, images, lambda image: image[14:241, 14:241])


def test_ten_crops_are_the_corners_centre_and_mirrors(prepared):
    _, _, out = prepared
    images = list(stored_images(out).values())
    crops = prepared_batches(out, training=False, ten_crop=True)

    def ten_views(image):
        views = [image[:227, :227], image[:227, 29:], image[29:, :227], image[29:, 29:],
                 image[14:241, 14:241]]
        return np.stack(views + [view[:, ::-1] for view in views])

    assert crops.shape == (len(images), 10, 227, 227, 3)
    matched(crops, images, ten_views)


def damaged_copy(out, directory):
    """`out` with the first record of its first training shard cut short, as a damaged disk
    block would, in `directory` (links to the other files)."""
    directory.mkdir()
    for name in os.listdir(out):
        if not name.startswith("."):
            os.symlink(os.path.join(out, name), directory / name)
    first = sources.read_prepared(out)["splits"]["train"]["shards"][0]
    (directory / first).unlink()
    with tf.io.TFRecordWriter(str(directory / first)) as writer:
        for i, record in enumerate(tf.data.TFRecordDataset(os.path.join(out, first))):
            example = tf.train.Example.FromString(record.numpy())
            if i == 0:
                jpeg = example.features.feature["image/encoded"].bytes_list.value
                jpeg[0] = jpeg[0][:len(jpeg[0]) // 2]
            writer.write(example.SerializeToString())
    return f"prepared:{directory}"


def test_a_damaged_prepared_record_is_skipped_and_counted_in_training(prepared, tmp_path):
    _, _, out = prepared
    ds, skipped = data.make_dataset(damaged_copy(out, tmp_path / "damaged"), "train", True, 1,
                                    config_for(out), data.Options(seed=0))
    images = sum(int(x.shape[0]) for x, _ in ds)
    assert int(skipped.numpy()) == 1
    assert images == sources.read_prepared(out)["splits"]["train"]["records"] - 1


@pytest.mark.parametrize("drop_remainder", [True, False], ids=["batches", "short_last_batch"])
def test_a_batch_keeps_its_images_beside_a_damaged_record(prepared, tmp_path, drop_remainder):
    """The damaged record's stand-in (and the padding of a short last batch, as through the
    tf.data service) is decoded with the batch: it must fit the windows drawn for the stored
    size, whatever the config's resize_size, or decoding fails and the batch is lost."""
    _, _, out = prepared
    source = damaged_copy(out, tmp_path / "damaged")
    config = dataclasses.replace(config_for(out), image_size=32, resize_size=36)
    reader = sources.Source(source)
    ds = reader.records("train", training=True, seed=0, serialized=True)
    # A pipeline for the tf.data service keeps its short last batch; this one runs here.
    options = data.Options(seed=0, deterministic=True,
                           data_service=None if drop_remainder else "grpc://not-used:1")
    pipeline = data._Pipeline(reader.info("train"), config, True, 4, 3, options,
                              data.SkipCounter(0))
    ds = data._prepared_training(ds, pipeline)
    records = sources.read_prepared(out)["splits"]["train"]["records"]
    kept = sum(int(labels.shape[0]) for _, labels in ds)
    expected = (records // 4) * 4 - 1 if drop_remainder else records - 1
    assert int(pipeline.skipped.count.numpy()) == 1
    assert kept == expected


def test_a_label_outside_the_classes_stops_prepared_training(prepared):
    _, _, out = prepared
    # The shards hold labels 0-2.
    ds, _ = data.make_dataset(sources.Source(f"prepared:{out}", num_classes=2), "train", True, 4,
                              config_for(out), data.Options(seed=0))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label outside \[0, 2\)"):
        for _ in ds:
            pass


def test_on_host_normalises_the_crops_in_the_pipeline(prepared):
    _, _, out = prepared
    config = config_for(out)
    host = data.on_host(data.make_dataset(f"prepared:{out}", "train", False, 4, config)[0],
                        config, training=False)
    uint8 = prepared_batches(out, training=False)
    images = np.concatenate([x.numpy() for x, _ in host])
    np.testing.assert_allclose(images, uint8 - np.asarray(config.mean, np.float32), atol=1e-4)


# --------------------------------------------------------------------------------------------
# The device-side stage


def test_input_stage_in_inference_only_normalises():
    config = preprocessing.PreprocessConfig(mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    out = preprocessing_layers.InputStage(config)(images, training=False).numpy()
    np.testing.assert_allclose(out, (images - [10.0, 20.0, 30.0]) / [2.0, 4.0, 5.0], rtol=1e-6)
    bgr = preprocessing_layers.InputStage(preprocessing.PreprocessConfig(bgr=True))(images).numpy()
    # The mean is in the model's channel order (BGR here).
    np.testing.assert_allclose(bgr, images[..., ::-1] - np.asarray(preprocessing.IMAGENET_MEAN),
                               rtol=1e-5, atol=1e-4)


def test_input_stage_in_training_gives_the_papers_lighting_and_flips():
    # Paper §4.1: each image gets eigvec @ (alpha * eigval), alpha ~ N(0, 0.1), on every pixel.
    # On a uniform grey image the shift along eigenvector i has std 0.1 * 255 * eigval_i.
    config = preprocessing.PreprocessConfig(mean=(0.0, 0.0, 0.0), flip=False)
    n = 4000
    images = np.full((n, 4, 4, 3), 128, np.uint8)
    out = preprocessing_layers.InputStage(config, seed=3)(images, training=True).numpy()
    shifts = out[:, 0, 0] - 128
    np.testing.assert_allclose(out, np.broadcast_to(shifts[:, None, None] + 128, out.shape),
                               atol=1e-3)  # the same shift on every pixel
    projected = shifts @ np.asarray(preprocessing.IMAGENET_EIGVEC)
    eigval = np.asarray(preprocessing.IMAGENET_EIGVAL) * 255
    np.testing.assert_allclose(projected.std(0), 0.1 * eigval, rtol=4 / np.sqrt(n) + 0.02)
    assert np.all(np.abs(projected.mean(0)) < 4 * 0.1 * eigval / np.sqrt(n))

    flipping = preprocessing.PreprocessConfig(mean=(0.0, 0.0, 0.0), eigval=None, eigvec=None)
    ramp = np.broadcast_to(np.arange(4, dtype=np.uint8)[None, None, :, None], (1000, 4, 4, 3))
    flipped = preprocessing_layers.InputStage(flipping, seed=4)(ramp, training=True).numpy()
    mirrored = np.all(flipped == ramp[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(mirrored | np.all(flipped == ramp, axis=(1, 2, 3)))
    assert 0.45 < mirrored.mean() < 0.55


# --------------------------------------------------------------------------------------------
# Trained on prepared data, served on the originals


@pytest.mark.slow
def test_a_run_on_prepared_data_serves_the_original_jpegs_as_evaluation_sees_them(
        prepared, tmp_path):
    from alexnet_tf import serving, training

    source, files, out = prepared
    config = train_config.TrainConfig(
        dataset=f"prepared:{out}", variant="small", image_size=64, init="paper",
        batch_size=4, epochs=3, steps_per_epoch=3, learning_rate=1e-3, schedule="constant",
        seed=1, pca="dataset")
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(config, workdir)
    model, class_names, pre = serving.load_run(workdir, "last")
    preprocessing_layers.run_input_stage(model, preprocessing_layers.InputStage(pre))
    assert pre.eigval == tuple(sources.read_prepared(out)["pca"]["eigval"])

    # Evaluation's view of each record, in the shards' order: its central 64 x 64 window
    # (make_dataset's, as test_evaluation_crop_is_the_central_window checks), through the
    # model's steps with their input stage.
    records = read_records(out, "train")
    names = [r["image/filename"].numpy().decode() for r in records]
    windows = np.stack([tf.io.decode_jpeg(r["image/encoded"]).numpy()[96:160, 96:160]
                        for r in records])
    evaluated = tf.nn.softmax(model.predict(windows, verbose=0)).numpy()

    export = serving.export_saved_model(model, str(tmp_path / "export"), class_names, pre)
    serve = tf.saved_model.load(export).signatures["serving_default"]
    originals = tf.constant([(source / name).read_bytes() for name in names])
    served = serve(image_bytes=originals)["probabilities"].numpy()

    # The same views up to resampling and the prepared JPEG: the two paths differ far less than
    # the images differ from each other.
    between_images = np.abs(evaluated[:, None] - evaluated[None]).sum(-1).mean()
    assert np.abs(served - evaluated).sum(-1).mean() < 0.2 * between_images
    assert (served.argmax(1) == evaluated.argmax(1)).mean() >= 0.9
