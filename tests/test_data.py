"""Every data source read from small files the test writes, bad data, determinism, sharding."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import data, inputs, sources
from alexnet_tf.preprocessing import PreprocessConfig
from tests.helpers import (ROOT, encode, jpeg_bomb, require, require_fashion_mnist, smooth_image,
                           write_folder_tree, write_idx, write_tfrecord)

SMALL = PreprocessConfig(image_size=32, resize_size=36)


def collect(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_folder_source_with_train_and_val_trees(tmp_path):
    write_folder_tree(tmp_path / "train", classes=("zebra", "ant"), per_class=3)
    write_folder_tree(tmp_path / "val", classes=("zebra", "ant"), per_class=2, fmt="png")
    source = f"folder:{tmp_path}"
    ds, _ = data.make_dataset(source, "train", True, 2, SMALL, data.Options(seed=0))
    assert sources.Source(source).info("train").class_names == ["ant", "zebra"]  # sorted
    images, labels = collect(ds.take(3))
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8  # crops; InputStage finishes them
    assert set(labels) <= {0, 1}
    ds, _ = data.make_dataset(source, "validation", False, 4, SMALL)
    images, labels = collect(ds)
    assert images.shape == (4, 32, 32, 3) and sorted(labels) == [0, 0, 1, 1]


def test_folder_source_seeded_split_is_stable_and_disjoint(tmp_path):
    write_folder_tree(tmp_path, classes=("a", "b"), per_class=30)
    source = sources.Source(f"folder:{tmp_path}")
    train, val = source.info("train"), source.info("validation")
    assert train.num_examples + val.num_examples == 60 and val.num_examples > 0
    first = [p.numpy() for _, _, p in source.records("validation")]
    second = [p.numpy() for _, _, p in sources.Source(f"folder:{tmp_path}").records("validation")]
    train_paths = {p.numpy() for _, _, p in source.records("train")}
    assert sorted(first) == sorted(second) and not set(first) & train_paths


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    paths = write_folder_tree(tmp_path / "train", classes=("a", "b"), per_class=3)
    with open(paths[0], "rb") as f:
        whole = f.read()
    with open(paths[0], "wb") as f:
        f.write(whole[: len(whole) // 2])  # truncated
    open(paths[1], "wb").close()  # zero bytes
    with open(paths[3], "wb") as f:
        f.write(b"this is a text file with a .jpg name")
    with open(paths[4], "wb") as f:
        f.write(whole[:100])  # cut inside its header, before the frame size
    ds, skipped = data.make_dataset(f"folder:{tmp_path}", "train", False, 10, SMALL)
    images, labels = collect(ds)
    assert len(images) == 2
    assert int(skipped.numpy()) == 4


@pytest.mark.parametrize("training", [True, False])
def test_images_over_the_pixel_budget_are_skipped_and_counted(tmp_path, hostile_images, training):
    paths = write_folder_tree(tmp_path / "train", classes=("a", "b"), per_class=3, size=(40, 50))
    os.remove(paths[0])
    shutil.copy(hostile_images["png_bomb"], paths[0][: -len(".jpg")] + ".png")
    with open(paths[4], "wb") as f:
        f.write(jpeg_bomb(20000, 20000))
    with open(paths[5], "wb") as f:  # one row over the budget below
        f.write(encode(smooth_image(41, 50), "jpeg"))
    config = PreprocessConfig(image_size=32, resize_size=36, max_pixels=40 * 50)
    ds, skipped = data.make_dataset(f"folder:{tmp_path}", "train", training, 1, config,
                                    data.Options(seed=0))
    images, _ = collect(ds)
    assert len(images) == 3  # paths[1:4], 40 x 50 each
    assert int(skipped.numpy()) == 3


def test_jpeg_named_folders_decode_without_a_format_branch_and_skip_impostors(tmp_path):
    paths = write_folder_tree(tmp_path / "train", classes=("a", "b"), per_class=3)
    with open(paths[2], "wb") as f:  # a PNG with a .jpg name (ImageNet has one)
        f.write(encode(smooth_image(40, 50), "png"))
    for training in (True, False):
        source = sources.Source(f"folder:{tmp_path}")
        ds, skipped = data.make_dataset(source, "train", training, 1, SMALL)
        assert source.info("train").jpeg_only
        images, labels = collect(ds)
        assert len(images) == 5 and int(skipped.numpy()) == 1
    # One real .png among the files: every file goes through the branch, the PNG decodes.
    os.rename(paths[2], paths[2][: -len(".jpg")] + ".png")
    source = sources.Source(f"folder:{tmp_path}")
    ds, skipped = data.make_dataset(source, "train", False, 1, SMALL)
    assert not source.info("train").jpeg_only
    assert len(collect(ds)[0]) == 6 and int(skipped.numpy()) == 0


@pytest.mark.parametrize("layout, message", [
    ("empty", "no class sub-directories"),
    ("no_images", "class folder has no .jpg/.jpeg/.png files"),
    ("missing", "no such directory"),
])
def test_folder_errors_name_the_path(tmp_path, layout, message):
    if layout == "no_images":
        write_folder_tree(tmp_path, classes=("a",), per_class=1)
        os.makedirs(tmp_path / "b")
        (tmp_path / "b" / "notes.txt").write_text("no images here")
    root = tmp_path / "nope" if layout == "missing" else tmp_path
    with pytest.raises(sources.DataError, match=message) as error:
        data.make_dataset(f"folder:{root}", "train", True, 2, SMALL)
    assert str(root) in str(error.value)
    assert "\n" not in str(error.value)


def test_tfrecord_source_with_split_placeholder_and_one_based_labels(tmp_path):
    write_tfrecord(str(tmp_path / "train-00000-of-00002"), [1, 2, 3])
    write_tfrecord(str(tmp_path / "train-00001-of-00002"), [3, 2])
    write_tfrecord(str(tmp_path / "validation-00000-of-00001"), [1, 3])
    source = sources.Source(f"tfrecord:{tmp_path}/{{split}}-*", num_classes=3,
                            one_based_labels=True)
    ds, _ = data.make_dataset(source, "train", False, 8, SMALL)
    images, labels = collect(ds)
    assert images.shape == (5, 32, 32, 3)
    assert sorted(labels) == [0, 1, 1, 2, 2]
    assert source.info("train").class_names == ["0", "1", "2"]
    _, labels = collect(data.make_dataset(source, "validation", False, 8, SMALL)[0])
    assert sorted(labels) == [0, 2]


def test_tfrecord_label_outside_num_classes_names_the_file(tmp_path):
    shard = str(tmp_path / "train-00000-of-00001")
    write_tfrecord(shard, [0, 7])
    ds, _ = data.make_dataset(sources.Source(f"tfrecord:{shard}", num_classes=3), "train", False,
                              4, SMALL)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label outside") as error:
        collect(ds)
    assert shard in str(error.value)


def test_tfrecord_glob_matching_nothing(tmp_path):
    with pytest.raises(sources.DataError, match=f"{tmp_path}/x-\\*: no TFRecord files match"):
        data.make_dataset(sources.Source(f"tfrecord:{tmp_path}/x-*", num_classes=2), "train",
                          True, 2, SMALL)


def test_idx_source_reads_written_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 12)
    write_idx(tmp_path, "train", images, labels)
    write_idx(tmp_path, "t10k", images[:5], labels[:5])
    source = sources.Source(f"fashion_mnist:{tmp_path}")
    pre = inputs.preprocess_config(source.info("train"))
    ds = data.on_host(data.make_dataset(source, "test", False, 5, pre)[0], pre, training=False)
    info = source.info("test")
    got, got_labels = collect(ds)
    assert info.class_names[9] == "Ankle boot" and info.channels == 1
    np.testing.assert_array_equal(got_labels, labels[:5])
    # Evaluation view of a 28x28 image is the image itself, normalised.
    np.testing.assert_allclose(got[..., 0], (images[:5] - 72.94) / 90.02,
                               rtol=1e-5, atol=1e-5)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    write_idx(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(3))
    import gzip
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(sources.DataError, match="truncated IDX file"):
        sources.Source(f"fashion_mnist:{tmp_path}").info("train")


def test_real_fashion_mnist():
    require_fashion_mnist()
    source = sources.Source("fashion_mnist")
    info = source.info("train")
    assert info.num_examples == 60_000 and info.image_size == (28, 28)
    config = inputs.preprocess_config(info)
    options = data.Options(seed=0)
    crops, _ = data.make_dataset(source, "train", True, 64, config, options)
    batch, labels = next(iter(data.on_host(crops, config, True, options)))
    assert batch.shape == (64, 28, 28, 1)
    assert abs(float(tf.reduce_mean(batch))) < 0.3  # normalised with the dataset's statistics
    assert len(set(labels.numpy().tolist())) > 5


def test_the_readmes_fashion_mnist_datasets_know_their_length():
    """The README's Colab block up to its fit(): Keras shows an epoch's total (and no "ran out of
    data" warning at its end) when the dataset knows its length."""
    require_fashion_mnist()
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split("## Use it from Python (Colab)")[1].split("```python\n")[1].split("```")[0]
    assert block.rstrip().endswith("model.fit(train, epochs=1, validation_data=test)")
    names = {}
    exec(block.rstrip().rsplit("\n", 1)[0], names)
    # Training drops the last, short batch; evaluation keeps it.
    assert int(names["train"].cardinality()) == 60_000 // 128
    assert int(names["test"].cardinality()) == -(-10_000 // 512)


def test_the_length_of_a_dataset_is_known_where_nothing_can_be_skipped(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path, "train", rng.integers(0, 256, (23, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, 23))
    write_idx(tmp_path, "t10k", rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, 7))
    idx = sources.Source(f"fashion_mnist:{tmp_path}")
    pre = inputs.preprocess_config(idx.info("train"))
    for split, training, batches in (("train", True, 23 // 5), ("test", False, 2)):
        ds, _ = data.make_dataset(idx, split, training, 5, pre)
        assert int(ds.cardinality()) == batches == sum(1 for _ in ds)
    repeated, _ = data.make_dataset(idx, "train", True, 5, pre, data.Options(repeat=True))
    assert repeated.cardinality() == tf.data.INFINITE_CARDINALITY
    # A folder's images may prove unreadable when read: its evaluation length is not promised.
    write_folder_tree(tmp_path / "photos" / "train", classes=("a", "b"), per_class=3)
    write_folder_tree(tmp_path / "photos" / "val", classes=("a", "b"), per_class=2)
    folder = sources.Source(f"folder:{tmp_path / 'photos'}")
    assert folder.info("train").num_examples == 6 and folder.info("validation").num_examples == 4
    evaluation, _ = data.make_dataset(folder, "validation", False, 3, SMALL)
    assert evaluation.cardinality() == tf.data.UNKNOWN_CARDINALITY
    assert sum(int(x.shape[0]) for x, _ in evaluation) == 4
    training, _ = data.make_dataset(folder, "train", True, 3, SMALL, data.Options(repeat=True))
    assert training.cardinality() == tf.data.INFINITE_CARDINALITY


def test_seeded_pipeline_is_deterministic(tmp_path):
    write_folder_tree(tmp_path / "train", classes=("a", "b"), per_class=4)
    source = f"folder:{tmp_path}"
    def two_batches(seed):
        return collect(data.make_dataset(source, "train", True, 4, SMALL,
                                         data.Options(seed=seed))[0].take(2))

    first, second, other = two_batches(5), two_batches(5), two_batches(6)
    np.testing.assert_array_equal(first[0], second[0])
    assert not np.array_equal(first[0], other[0])


def test_autotuning_thread_is_off_unless_asked(tmp_path):
    # With it on, TensorFlow 2.21 can hold an iterator's destruction (Keras: before every
    # validation) until the autotuner wakes up, tens of seconds into a long epoch.
    write_folder_tree(tmp_path / "train", classes=("a", "b"), per_class=2)
    source = f"folder:{tmp_path}"
    for training in (True, False):
        ds, _ = data.make_dataset(source, "train", training, 2, SMALL)
        assert ds.options().autotune.enabled is False
        assert len(collect(ds)[1]) == 4
    tuned, _ = data.make_dataset(source, "train", False, 2, SMALL, data.Options(autotune=True))
    assert tuned.options().autotune.enabled is True


def test_sharding_gives_disjoint_parts(tmp_path):
    for i in range(4):
        write_tfrecord(str(tmp_path / f"train-{i}"), [i] * 3)
    parts = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        ds, _ = data.make_dataset(sources.Source(f"tfrecord:{tmp_path}/train-*", num_classes=4),
                                  "train", False, 12, SMALL, data.Options(input_context=context))
        parts.append(sorted(collect(ds)[1].tolist()))
    assert sorted(parts[0] + parts[1]) == sorted([0, 1, 2, 3] * 3)
    assert not set(parts[0]) & set(parts[1])


def test_tfds_source_with_mock_data():
    tfds = require("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=8):
        source = sources.Source("tfds:cifar10")
        ds, _ = data.make_dataset(source, "train", True, 4, SMALL, data.Options(seed=0))
        images, labels = collect(ds.take(2))
        info = source.info("train")
    # Offline, TFDS knows the features from code (10 labels, 32x32x3) but not the label names.
    assert info.num_classes == 10 and info.image_size == (32, 32) and info.channels == 3
    assert images.shape == (8, 32, 32, 3) and labels.max() < 10


@pytest.mark.parametrize("kind, names, mean_std, flip", [
    # Fashion-MNIST's and MNIST's published training-set statistics, 0.2860/0.3530 and
    # 0.1307/0.3081 of the pixel range; digits are not mirrored.
    ("fashion_mnist", ("T-shirt/top", "Ankle boot"), (0.2860 * 255, 0.3530 * 255), True),
    ("mnist", ("0", "9"), (0.1307 * 255, 0.3081 * 255), False),
])
def test_without_the_debian_package_tfds_gives_the_idx_files_normalisation(
        monkeypatch, tmp_path, kind, names, mean_std, flip):
    """Where Debian's IDX files are absent (Colab), fashion_mnist and mnist come from TFDS, and
    the run preprocesses them as it would the IDX files: same statistics, same flips."""
    tfds = require("tensorflow_datasets")
    monkeypatch.setitem(sources.IDX_DIRS, kind, str(tmp_path / "absent"))
    with tfds.testing.mock_data(num_examples=8, data_dir=str(tmp_path / "tfds")):
        info = sources.Source(kind).info("train")
    assert info.source == f"tfds:{kind}"
    assert (info.class_names[0], info.class_names[-1]) == names
    pre = inputs.preprocess_config(info)
    assert pre.mean == pytest.approx((mean_std[0],), abs=0.02)
    assert pre.std == pytest.approx((mean_std[1],), abs=0.02)
    assert pre.flip is flip


def test_every_kind_the_flags_offer_has_a_reader():
    from alexnet_tf import flag_facts

    assert list(sources.READERS) == list(flag_facts.SOURCE_KINDS)


@pytest.mark.parametrize("source, message", [
    ("imagenet", "unknown dataset 'imagenet'"),
    ("folder:", "needs a value after 'folder:'"),
])
def test_bad_source_strings(source, message):
    with pytest.raises(sources.DataError, match=message):
        sources.parse_source(source)


def test_a_source_lists_each_split_once_and_a_new_source_sees_new_files(tmp_path, monkeypatch):
    write_folder_tree(tmp_path / "train", classes=("a", "b"), per_class=2)
    write_folder_tree(tmp_path / "val", classes=("a", "b"), per_class=1)
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(str(path)) or real_scandir(path))
    source = sources.Source(f"folder:{tmp_path}")
    for _ in range(3):
        assert source.info("train").num_examples == 4
        assert len(collect(data.make_dataset(source, "train", False, 4, SMALL)[0])[1]) == 4
    class_folders = [p for p in listed if os.path.basename(p) in ("a", "b")]
    assert sorted(class_folders) == [str(tmp_path / "train" / "a"), str(tmp_path / "train" / "b")]
    # The listing is the source's: a new image is seen by a new Source.
    with open(tmp_path / "train" / "b" / "new.png", "wb") as f:
        f.write(encode(smooth_image(40, 50), "png"))
    assert source.info("train").num_examples == 4
    assert sources.Source(f"folder:{tmp_path}").info("train").num_examples == 5
