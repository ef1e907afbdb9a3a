"""A user's own folder of photos: broken files, empty splits, names that are not UTF-8, a resume
with other settings. Each ends in a run that works, skipping and counting, or in one line."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_tf import backup as backup_lib
from alexnet_tf import data, inputs, scans, sources, train_config, training
from alexnet_tf.preprocessing import PreprocessConfig
from tests.helpers import (ROOT, assert_one_line_error, encode, pixel_eigenvalues, run_train,
                           settled_inputs, smooth_image, tiny_config, write_folder_tree)


def in_validation(name):
    """The hash split's rule, restated from its definition: the first byte of the md5 of the
    file name's bytes below 10% of 256."""
    return hashlib.md5(name).digest()[0] < 25.6


def names(split, count, prefix=b"photo", suffix=b".jpg"):
    """`count` file names (bytes) that the hash split puts in `split`."""
    found, i = [], 0
    while len(found) < count:
        name = b"%s_%d%s" % (prefix, i, suffix)
        if in_validation(name) == (split == "validation"):
            found.append(name)
        i += 1
    return found


def write(folder, name, content):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.fsencode(str(folder)), name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def photo(seed, size=(40, 50)):
    return encode(smooth_image(*size, seed=seed), "jpeg")


def damaged_inside(seed=0):
    """A JPEG with its start and end markers and its header intact and its entropy-coded data
    replaced by noise: it passes every check of the bytes, and decoding it fails."""
    data_ = bytearray(encode(smooth_image(60, 80, seed=seed), "jpeg"))
    start = data_.index(b"\xff\xda") + 12  # past the start-of-scan header
    data_[start:-2] = np.random.default_rng(seed).integers(0, 256, len(data_) - start - 2,
                                                           dtype=np.uint8).tobytes()
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(bytes(data_))
    return bytes(data_)


def photo_folder(root, per_class=8, validation=2, classes=("cat", "dog")):
    """Class folders of `per_class` photos, `validation` of them named into the validation
    split."""
    for c, name in enumerate(classes):
        for i, file in enumerate(names("train", per_class - validation, name.encode())
                                 + names("validation", validation, name.encode())):
            write(root / name, file, photo(10 * c + i))
    return f"folder:{root}"


def tiny_pre():
    """Crops of 32 from photos resized to 36."""
    return PreprocessConfig(image_size=32, resize_size=36)


def test_a_split_of_files_damaged_inside_is_refused_though_their_bytes_look_whole(tmp_path):
    root = tmp_path / "photos"
    for name in ("a", "b"):
        write(root / name, names("train", 1, name.encode())[0], damaged_inside())
    with pytest.raises(sources.DataError, match=r"the train split has 0 readable image\(s\) of 2 "
                       r"file\(s\).*skipped: 2 could not be decoded"):
        scans.check_split(f"folder:{root}", "train", 1, "this test", 10**8)


def test_a_run_lists_each_split_of_its_folder_once(tmp_path, monkeypatch):
    """The split checks, the preprocessing (and its PCA sample), the pipelines, the TensorBoard
    grid and the ten-crop evaluation of one train_and_evaluate all read one Source."""
    root = tmp_path / "photos"
    write_folder_tree(root / "train", classes=("cat", "dog"), per_class=4)
    write_folder_tree(root / "val", classes=("cat", "dog"), per_class=2)
    scanned, listed = [], []
    real_scandir, real_listdir = os.scandir, os.listdir
    monkeypatch.setattr(os, "scandir", lambda path: scanned.append(str(path))
                        or real_scandir(path))
    monkeypatch.setattr(os, "listdir", lambda path: listed.append(str(path))
                        or real_listdir(path))
    config = tiny_config(tmp_path, dataset=f"folder:{root}", batch_size=4, pca="dataset",
                         ten_crop_eval=True)
    results = training.train_and_evaluate(config, str(tmp_path / "run"))
    assert "ten_crop_top1" in results
    class_folders = sorted(p for p in scanned if os.path.basename(p) in ("cat", "dog"))
    assert class_folders == sorted(str(root / split / name) for split in ("train", "val")
                                   for name in ("cat", "dog"))
    split_roots = sorted(p for p in listed if p.startswith(str(root)))
    assert split_roots == [str(root / "train"), str(root / "val")]


def test_a_validation_split_of_only_broken_files_stops_before_training(tmp_path):
    root = tmp_path / "photos"
    for c, name in enumerate(("cat", "dog")):
        for i, file in enumerate(names("train", 6, name.encode())):
            write(root / name, file, photo(10 * c + i))
    cat_val = names("validation", 2, b"cat")
    write(root / "cat", cat_val[0], b"")  # empty
    write(root / "cat", cat_val[1], photo(1)[:300])  # truncated
    write(root / "dog", names("validation", 1, b"dog")[0], b"text, named as a photo")
    config = tiny_config(tmp_path, dataset=f"folder:{root}", batch_size=4)
    with pytest.raises(sources.DataError) as error:
        training.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(error.value)
    assert "the validation split has 0 readable image(s) of 3 file(s)" in message
    assert "skipped: 3 not a whole JPEG or PNG file" in message and "\n" not in message
    assert message.endswith(f"; this folder holds out about 10% of its files, chosen by name, "
                            f"for validation: add images, or choose the validation images with "
                            f"{root}/train/<class>/ and {root}/val/<class>/ sub-folders")
    assert not os.path.exists(tmp_path / "run" / "backup")  # nothing was trained


def small_folder_with_broken_files(root):
    """8 photographs per class, all of them named into the training split, and 3 broken files,
    one of them the validation split's only file."""
    for c, name in enumerate(("cat", "dog")):
        for i, file in enumerate(names("train", 8, name.encode())):
            write(root / name, file, photo(10 * c + i))
    write(root / "cat", names("train", 9, b"cat")[8], b"")
    write(root / "dog", names("train", 9, b"dog")[8], b"text, named as a photo")
    write(root / "dog", names("validation", 1, b"dog")[0], photo(1)[:300])
    return f"folder:{root}"


def test_a_small_folder_says_how_to_get_validation_images(tmp_path):
    root = tmp_path / "photos"
    config = tiny_config(tmp_path, dataset=small_folder_with_broken_files(root), batch_size=4,
                         eval_steps=None)
    with pytest.raises(sources.DataError) as error:
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(error.value) == (
        f"folder:{root}: the validation split has 0 readable image(s) of 1 file(s), fewer than "
        f"the 1 that validation needs; skipped: 1 not a whole JPEG or PNG file; this folder holds "
        f"out about 10% of its files, chosen by name, for validation: add images, or choose the "
        f"validation images with {root}/train/<class>/ and {root}/val/<class>/ sub-folders")
    # The way out it names works: the same files in train/ and val/ sub-folders.
    for name in ("cat", "dog"):
        os.renames(root / name, root / "train" / name)
        good = names("train", 1, name.encode())[0].decode()
        os.renames(root / "train" / name / good, root / "val" / name / good)
    source = sources.Source(f"folder:{root}")
    inputs.check_splits(config, source)
    assert source.info("validation").num_examples == 2


@pytest.mark.slow
def test_a_small_folder_is_one_line_naming_the_way_out(tmp_path):
    root = tmp_path / "photos"
    result = run_train([f"--dataset={small_folder_with_broken_files(root)}", "--variant=cifar",
                        "--lrn=tf_cifar10", "--init=keras", "--batch_size=4", "--epochs=1",
                        "--steps_per_epoch=2", f"--workdir={tmp_path / 'run'}"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "the validation split has 0 readable image(s) of "
                          "1 file(s)", "for validation: add images, or choose the validation "
                          f"images with {root}/train/<class>/ and {root}/val/<class>/ sub-folders")


def test_eval_steps_beyond_the_validation_split_are_refused_before_training(tmp_path):
    source = photo_folder(tmp_path / "photos", per_class=8, validation=2)  # 4 validation images
    config = tiny_config(tmp_path, dataset=source, batch_size=4, eval_steps=2)
    with pytest.raises(sources.DataError, match=r"the validation split has 4 readable "
                       r"image\(s\) of 4 file\(s\), fewer than the 5 that --eval_steps=2 at "
                       r"--batch_size=4.*, or use a smaller --eval_steps$"):
        training.train_and_evaluate(config, str(tmp_path / "run"))


def test_too_few_readable_training_images_for_one_batch_are_refused(tmp_path):
    source = photo_folder(tmp_path / "photos", per_class=3, validation=1)  # 4 training images
    config = tiny_config(tmp_path, dataset=source, batch_size=8)
    with pytest.raises(sources.DataError, match=r"the train split has 4 readable image\(s\) of 4 "
                       r"file\(s\), fewer than the 8 that one training batch \(--batch_size=8\) "
                       r"needs; .*add readable images to the train split, or use a smaller "
                       r"--batch_size$"):
        training.train_and_evaluate(config, str(tmp_path / "run"))


def test_pca_from_the_dataset_skips_and_counts_a_jpeg_damaged_inside(tmp_path):
    root = tmp_path / "photos"
    good = []
    for c, name in enumerate(("a", "b")):
        for i, file in enumerate(names("train", 3, name.encode())):
            good.append(write(root / name, file, photo(10 * c + i)))
    write(root / "a", names("train", 4, b"a")[3], damaged_inside())
    inputs, _ = settled_inputs(tmp_path, f"folder:{root}")
    # Every pixel of the six readable images, covariance in numpy.
    np.testing.assert_allclose(inputs.preprocess.eigval, pixel_eigenvalues(good), rtol=1e-6)
    images, skips = scans.decoded_sample(f"folder:{root}", 1000, 10**8)
    assert len(images) == 6 and skips.describe() == "1 could not be decoded"


def test_a_file_name_that_is_not_utf8_trains_and_splits_by_its_bytes(tmp_path):
    root = tmp_path / "photos"
    photo_folder(root, per_class=4, validation=1, classes=("a", "b"))
    latin1 = names("train", 1, prefix=b"caf\xe9")[0]  # "café" in Latin-1: not UTF-8
    write(root / "a", latin1, photo(99))
    with pytest.raises(UnicodeDecodeError):
        latin1.decode("utf-8")
    splits = {}
    for split in ("train", "validation"):
        ds = sources.Source(f"folder:{root}").records(split)
        splits[split] = {os.path.basename(origin.numpy()) for _, _, origin in ds}
    assert latin1 in splits["train"] and latin1 not in splits["validation"]
    assert len(splits["train"]) == 7 and len(splits["validation"]) == 2
    ds, skipped = data.make_dataset(f"folder:{root}", "train", True, 7, tiny_pre())
    images, labels = next(iter(ds))
    assert images.shape[0] == 7 and int(skipped.numpy()) == 0


def test_links_to_nothing_and_directories_named_as_photos_are_skipped_and_counted(tmp_path):
    root = tmp_path / "photos"
    photo_folder(root, per_class=4, validation=0, classes=("a", "b"))
    os.symlink(tmp_path / "nowhere.jpg", root / "a" / names("train", 5, b"a")[4].decode())
    os.makedirs(root / "b" / names("train", 5, b"b")[4].decode())
    ds, skipped = data.make_dataset(f"folder:{root}", "train", False, 16, tiny_pre())
    images, _ = next(iter(ds))
    assert images.shape[0] == 8 and int(skipped.numpy()) == 2
    with pytest.raises(sources.DataError, match=r"has 8 readable image\(s\) of 10 file\(s\), fewer "
                       r"than the 9 .*skipped: 2 not a readable file"):
        scans.check_split(f"folder:{root}", "train", 9, "this test", 10**8)


def test_resuming_with_another_variant_names_each_differing_flag(tmp_path):
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(tiny_config(tmp_path), workdir)
    backup = sorted(os.listdir(os.path.join(workdir, "backup")))
    other = tiny_config(tmp_path, variant="small", lrn="paper", epochs=2)
    with pytest.raises(train_config.TrainingError) as error:
        training.train_and_evaluate(other, workdir)
    message = str(error.value)
    assert "--variant=small (the run has cifar)" in message
    assert "--lrn=paper (the run has tf_cifar10)" in message
    assert "another --workdir" in message and "--start_over" in message and "\n" not in message
    assert sorted(os.listdir(os.path.join(workdir, "backup"))) == backup  # nothing touched
    # --start_over trains the new variant from the first epoch, its preprocessing settled anew.
    results = training.train_and_evaluate(dataclasses.replace(other, start_over=True), workdir)
    assert "top1" in results
    model = keras.models.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    assert int(model.optimizer.iterations) == 4  # two epochs of two steps: not resumed


def test_a_backup_that_does_not_fit_the_model_is_one_short_line(tmp_path):
    def model(width):
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(2, name="fc8")(keras.layers.Dense(width, name="fc6")(inputs))
        built = keras.Model(inputs, outputs)
        built.compile(optimizer="sgd", loss="mse")
        return built

    saving = backup_lib.Backup(str(tmp_path / "b"))
    saving.set_model(model(8))
    saving.save(1)
    with pytest.raises(backup_lib.BackupError) as error:
        backup_lib.Backup(str(tmp_path / "b")).restore(model(16))
    message = str(error.value).replace(str(tmp_path), "")
    assert "weights-1.weights.h5 is unreadable" in message and "\n" not in message
    assert len(message) <= 200, message
    assert "[[" not in message and "value=" not in message  # no tensor values


def every_broken_kind(root):
    """A folder of photos holding one file of every kind a real crawl holds, all named into the
    training split, and an empty file in the validation split. Returns {name: the reason
    prepare.py gives for skipping it, or None where it is an image that must be read}."""
    photo_folder(root, per_class=8, validation=2)
    cat, dog = root / "cat", root / "dog"
    odd = iter(names("train", 20, b"odd"))
    cmyk = __import__("io").BytesIO()
    Image.fromarray(smooth_image(40, 50)).convert("CMYK").save(cmyk, "JPEG")
    files = {
        "truncated": (cat, photo(1)[:400], "not a whole JPEG or PNG file"),
        "empty": (cat, b"", "not a whole JPEG or PNG file"),
        "text": (dog, b"<html>not found</html>", "not a whole JPEG or PNG file"),
        "png_named_jpg": (dog, encode(smooth_image(40, 50), "png"), None),
        "cmyk": (cat, cmyk.getvalue(), None),
        "over_max_pixels": (dog, photo(2, size=(120, 120)), "its header declares more pixels "
                            "than max_pixels"),
        "damaged_inside": (cat, damaged_inside(), "could not be decoded"),
    }
    expected = {}
    for kind, (folder, content, reason) in files.items():
        name = next(odd)
        write(folder, name, content)
        expected[os.fsdecode(os.path.join(os.fsencode(str(folder)), name))] = reason
    deep = names("train", 1, b"deep", b".png")[0]
    write(dog, deep, tf.io.encode_png(tf.constant(smooth_image(40, 50).astype(np.uint16)
                                                  * 257)).numpy())
    expected[os.fsdecode(os.path.join(os.fsencode(str(dog)), deep))] = None
    latin1 = names("train", 1, b"caf\xe9")[0]
    write(cat, latin1, photo(3))
    expected[os.fsdecode(os.path.join(os.fsencode(str(cat)), latin1))] = None
    link, directory = (os.fsdecode(next(odd)) for _ in range(2))
    os.symlink(root / "gone.jpg", cat / link)
    os.makedirs(dog / directory)
    expected[str(cat / link)] = expected[str(dog / directory)] = "not a readable file"
    write(cat, names("validation", 3, b"cat")[2], b"")
    return expected


def run_module(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, errors="backslashreplace")


def assert_worked(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_every_broken_kind_of_file_through_every_command(tmp_path):
    photos = tmp_path / "photos"
    expected = every_broken_kind(photos)
    tiny = ["--variant=cifar", "--lrn=tf_cifar10", "--init=keras", "--batch_size=4",
            "--epochs=1", "--steps_per_epoch=2"]
    # Over this budget: the 120 x 120 photo (prepared images are 256 x 256, trained without it).
    budget = "--max_pixels=10000"
    runs = {
        "dataset_inception_ten_crop": ["--pca=dataset", "--crop=inception", "--ten_crop_eval"],
        "imagenet_paper": ["--pca=imagenet", "--crop=paper"],
        "no_lighting": ["--pca=none"],
    }
    for name, flags in runs.items():
        result = run_train([f"--dataset=folder:{photos}", *tiny, budget, *flags,
                            f"--workdir={tmp_path / name}"], cwd=tmp_path)
        assert_worked(result)
        assert "unreadable or oversized images so far" in result.stdout, name
        assert "final: top-1 accuracy" in result.stdout, name
    # prepare.py lists every file it skipped, with its reason, and reads every other image.
    prepared = tmp_path / "prepared"
    result = run_module([os.path.join(ROOT, "prepare.py"), f"--dataset=folder:{photos}",
                         f"--output_dir={prepared}", budget], cwd=tmp_path)
    assert_worked(result)
    with open(prepared / "dataset.json") as f:
        description = json.load(f)
    skipped = {entry["file"]: entry["reason"]
               for entry in description["splits"]["train"]["skipped"]}
    assert skipped == {path: reason for path, reason in expected.items() if reason}
    assert description["splits"]["train"]["records"] == 12 + sum(
        reason is None for reason in expected.values())
    assert len(description["splits"]["validation"]["skipped"]) == 1
    result = run_train([f"--dataset=prepared:{prepared}", *tiny, "--pca=dataset",
                        f"--workdir={tmp_path / 'prepared_run'}"], cwd=tmp_path)
    assert_worked(result)
    # The run exports, and its augmentations are drawn from the same folder.
    run = tmp_path / "dataset_inception_ten_crop"
    result = run_module([os.path.join(ROOT, "export.py"), f"--workdir={run}",
                         f"--export_dir={tmp_path / 'exports'}"], cwd=tmp_path)
    assert_worked(result)
    result = run_module(["-m", "alexnet_tf.visualize", "augmentations", f"--workdir={run}"],
                        cwd=tmp_path)
    assert_worked(result)
    assert os.path.exists(run / "augmentations.png")
    # A resume with other settings is one line, and so is a split the guard leaves empty.
    result = run_train([f"--dataset=folder:{photos}", *tiny, budget, "--variant=small",
                        f"--workdir={run}"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "--variant=small (the run has cifar)")
    result = run_train([f"--dataset=folder:{photos}", *tiny, budget, "--eval_steps=3",
                        f"--workdir={tmp_path / 'too_few'}"], cwd=tmp_path)
    assert_one_line_error(result, "train.py", "the validation split has 4 readable image(s) "
                          "of 5 file(s), fewer than the 9 that --eval_steps=3 at --batch_size=4",
                          "or use a smaller --eval_steps")
