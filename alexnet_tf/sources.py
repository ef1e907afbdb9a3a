"""Data sources: what a dataset holds and the records of each of its splits, read once per run.

A source is named by a string that fits in a flag (`flag_facts.SOURCE_KINDS` holds the kinds):
    tfds:<name>          any TFDS image-classification dataset (imagenet2012 needs a manual dir)
    tfrecord:<glob>      ImageNet-style shards (image/encoded, image/class/label); a "{split}" in
                         the glob is replaced by the split name (train, validation)
    prepared:<dir>       the output of prepare.py: 256 x 256 JPEG shards, cropped without resizing
    folder:<path>        one sub-directory per class of JPEG/PNG files; train/ and val/ sub-trees
                         when present, otherwise a seeded 90/10 split
    fashion_mnist[:<dir>], mnist[:<dir>]
                         IDX .gz files (default: Debian's dataset-fashion-mnist location); TFDS
                         when the files are absent

`Source(name)` is built once and handed to everything that reads the data: `info(split)` lists
a split's files (or opens its builder) the first time it is asked and keeps what it found;
`records(split, ...)` makes a fresh dataset of that split's records from it.
"""

import dataclasses
import enum
import os

import numpy as np
import tensorflow as tf
from absl import logging

from alexnet_tf import guard, preprocessing
from alexnet_tf.flag_facts import SOURCE_KINDS, SOURCE_KINDS_HELP
from alexnet_tf.source_files import (DataError, held_out_way_out, in_validation_split,
                                     list_class_folders, parse_examples, printable, read_idx,
                                     read_prepared)

IDX_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The pixel statistics of the IDX datasets, read from the IDX files or from TFDS (where the IDX
# files are absent, as on Colab); other sources: None, and the preprocessing decides.
IDX_MEAN_STD = {"fashion_mnist": preprocessing.FASHION_MNIST_MEAN_STD,
                "mnist": preprocessing.MNIST_MEAN_STD}
# Datasets whose images are not mirror-symmetric (digits): trained without flips.
UNFLIPPABLE = ("mnist",)
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "validation"}
# TFRecord and prepared shards read at once, and the files shuffled before reading in training.
SHARDS_READ_AT_ONCE = 16
SHARD_SHUFFLE_BUFFER = 1024


class SourceKind(enum.Enum):
    """How a source's records are read: decoded arrays in memory (IDX), a TFDS dataset, or files
    of encoded images (a folder tree, TFRecord shards, prepare.py's shards) that
    `Source.records` reads in parallel."""

    IDX = "idx"
    TFDS = "tfds"
    FOLDER = "folder"
    TFRECORD = "tfrecord"
    PREPARED = "prepared"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about one split of a source.

    Attributes:
        source: the source string.
        kind: how its records are read.
        class_names: label names, index = label.
        channels: 1 or 3.
        image_size: native (height, width) when every image has it (MNIST, CIFAR), else None.
        num_examples: records in the split, or None when unknown without a full pass.
        jpeg_only: every record is named as a JPEG (folder sources with only .jpg/.jpeg files,
            prepared sources): the pipeline decodes with no format branch and skips and counts any
            that is not.
        prepared: a prepared source's description (prepare.py's dataset.json), else None.
        not_files: folder entries named as images that are no readable file (a broken link, a
            directory): left out of the records, and counted as skipped once.
        mean_std: the pixel mean and standard deviation of a grey dataset that has its own
            (Fashion-MNIST, MNIST), else None.
        flippable: its images may be mirrored in training (not digits).
        encoded: its records hold encoded bytes, which may prove unreadable; else decoded
            arrays (IDX, TFDS's decoded fallback for them), all of which are images.
        held_out: a folder source without train/ and val/ sub-folders, whose validation
            images are held out of its class folders by file-name hash.
    """

    source: str
    kind: SourceKind
    class_names: list
    channels: int
    image_size: tuple | None = None
    num_examples: int | None = None
    jpeg_only: bool = False
    prepared: dict | None = None
    not_files: tuple = ()
    mean_std: tuple | None = None
    flippable: bool = True
    encoded: bool = True
    held_out: bool = False

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def small_images(self):
        return self.image_size is not None and max(self.image_size) <= 64


def class_names_for(names, num_classes):
    """`names` when there are `num_classes` of them, else the class ids as names."""
    return list(names) if len(names) == num_classes else [str(i) for i in range(num_classes)]


def parse_source(source):
    """Splits "kind:arg" and validates the kind; returns (kind, arg or None)."""
    kind, _, arg = source.partition(":")
    if kind not in SOURCE_KINDS:
        raise DataError(f"unknown dataset {source!r}: use {SOURCE_KINDS_HELP}")
    if SOURCE_KINDS[kind][1] and not arg:
        raise DataError(f"dataset {source!r} needs a value after '{kind}:'")
    return kind, arg or None


# --------------------------------------------------------------------------------------------
# The source


class Source:
    """A dataset, read once: each split's description and a way to make its records.

    Args:
        name: the source string (module docstring).
        data_dir: TFDS data directory.
        num_classes: labels lie in [0, num_classes) (tfrecord sources need it).
        one_based_labels: TFRecord labels start at 1 (tensorflow/models' ImageNet scripts).
    """

    def __init__(self, name, data_dir=None, num_classes=None, one_based_labels=False):
        self.kind, self.arg = parse_source(name)
        self.name = name
        self.data_dir = data_dir
        self.num_classes = num_classes
        self.one_based_labels = one_based_labels and self.kind != "prepared"  # written from 0
        self._splits = {}

    def info(self, split):
        """The split's DatasetInfo; its files are listed the first time only."""
        return self._split(split)[0]

    def records(self, split, training=False, seed=None, input_context=None,
                deterministic=False, order_seed=None, serialized=False,
                parallel_reads=tf.data.AUTOTUNE):
        """A split's records, before any preprocessing: (image, label, origin), where `image` is
        a uint8 [H, W, C] tensor or encoded bytes and `origin` names the file it came from.

        `training`: files in a fresh random order each epoch (TFDS: shuffled files).
        `order_seed` (not training): a folder tree's files in one fixed pseudo-random order, the
        same in every iterator, instead of class by class (prepare.py writes its shards in that
        order). `serialized`: TFRecord and prepared sources yield the serialized
        tf.train.Example strings, for parsing per batch (`parse_examples`). File sources are
        sharded by file under `input_context` (a `tf.distribute.InputContext`).
        """
        info, items = self._split(split)
        ds = items(training=training, seed=seed, input_context=input_context)
        sharded_by_tfds = info.kind is SourceKind.TFDS and input_context is not None
        if (input_context is not None and input_context.num_input_pipelines > 1
                and not sharded_by_tfds):
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if info.kind is SourceKind.FOLDER:
            if training or order_seed is not None:
                ds = ds.shuffle(info.num_examples, seed=seed if training else order_seed,
                                reshuffle_each_iteration=training)
            return ds.map(lambda path, label: (tf.io.read_file(path), label, path),
                          num_parallel_calls=parallel_reads, deterministic=deterministic)
        if info.kind in (SourceKind.TFRECORD, SourceKind.PREPARED):
            if training:
                ds = ds.shuffle(SHARD_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
            one_based = self.one_based_labels
            if serialized:
                read = tf.data.TFRecordDataset
            else:
                def read(path):
                    return tf.data.TFRecordDataset(path).map(
                        lambda r: (*parse_examples(r, one_based), path))
            return ds.interleave(read, cycle_length=SHARDS_READ_AT_ONCE,
                                 num_parallel_calls=parallel_reads, deterministic=deterministic)
        return ds

    def _split(self, split):
        split = SPLIT_ALIASES.get(split, split)
        if split not in self._splits:
            self._splits[split] = READERS[self.kind](self, split)
        return self._splits[split]


def as_source(source, **source_args):
    """`source` itself when it is a Source, else the Source of that string."""
    return source if isinstance(source, Source) else Source(source, **source_args)


# --------------------------------------------------------------------------------------------
# The readers of each kind. Each returns (DatasetInfo, items), where items(training, seed,
# input_context) makes the split's items afresh from what the reader found: records for IDX and
# TFDS, the files for folders and shards, which Source.records reads.


def _idx_split(kind, directory, split, data_dir):
    directory = directory or IDX_DIRS[kind]
    split = {"validation": "test"}.get(split, split)
    if split not in IDX_FILES:
        raise DataError(f"{kind} has splits train and test, not {split!r}")
    images_path, labels_path = (os.path.join(directory, f) for f in IDX_FILES[split])
    if not os.path.exists(images_path):
        if directory != IDX_DIRS[kind]:
            raise DataError(f"{images_path} not found")
        logging.info("%s not found; falling back to TFDS %s", images_path, kind)
        return _tfds_split(kind, split, data_dir, decode=True)
    images, labels = read_idx(images_path)[..., None], read_idx(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels")
    names = FASHION_MNIST_CLASSES if kind == "fashion_mnist" else tuple(str(i) for i in range(10))
    if labels.max() >= len(names):
        raise DataError(f"{labels_path}: label {labels.max()} outside [0, {len(names)})")
    info = DatasetInfo(f"{kind}:{directory}", SourceKind.IDX, list(names), 1, images.shape[1:3],
                       len(images), mean_std=IDX_MEAN_STD[kind],
                       flippable=not kind.startswith(UNFLIPPABLE), encoded=False)
    labels = labels.astype(np.int32)

    def items(**_):
        origin = tf.constant(images_path)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return ds.map(lambda x, y: (x, y, origin))

    return info, items


def _tfds_split(name, split, data_dir, decode=False):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses
        raise DataError(f"TFDS dataset {name!r}: {str(e).splitlines()[0]}") from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"TFDS dataset {name!r} has no 'image' and 'label' features")
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        logging.info("Preparing TFDS %s in %s (downloads unless a manual dir holds it)",
                     name, builder.data_dir)
        builder.download_and_prepare()
    splits = builder.info.splits
    if split == "validation" and "validation" not in splits and "test" in splits:
        split = "test"
    if splits and split not in splits:
        raise DataError(f"TFDS dataset {name!r} has no split {split!r} ({sorted(splits)})")
    shape = features["image"].shape
    size = tuple(shape[:2]) if None not in shape[:2] else None
    info = DatasetInfo(
        f"tfds:{name}", SourceKind.TFDS, list(features["label"].names), shape[-1] or 3, size,
        splits[split].num_examples if split in splits else None,
        mean_std=IDX_MEAN_STD.get(name), flippable=not name.startswith(UNFLIPPABLE),
        encoded=not decode)

    def items(training, seed, input_context):
        read_config = tfds.ReadConfig(shuffle_seed=seed, input_context=input_context)
        ds = builder.as_dataset(
            split=split, shuffle_files=training, read_config=read_config,
            decoders=None if decode else {"image": tfds.decode.SkipDecoding()})
        origin = tf.constant(f"tfds:{name}/{split}")
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32), origin))

    return info, items


def _folder_split(root, split):
    sub = {"train": "train", "validation": "val"}.get(split)
    if sub is None:
        raise DataError(f"folder datasets have splits train and validation, not {split!r}")
    held_out = not os.path.isdir(os.path.join(root, "train"))
    if not held_out:
        split_root = os.path.join(root, sub)
        if sub == "val" and not os.path.isdir(split_root):
            split_root = os.path.join(root, "validation")
        classes, files, labels, not_files = list_class_folders(split_root)
    else:
        classes, files, labels, not_files = list_class_folders(root)
        keep = [in_validation_split(f) == (split == "validation") for f in files]
        files = [f for f, k in zip(files, keep) if k]
        labels = [y for y, k in zip(labels, keep) if k]
        not_files = tuple(f for f in not_files if
                          in_validation_split(f) == (split == "validation"))
        if not files and not not_files:
            way_out = f"; {held_out_way_out(root)}" if split == "validation" else ""
            raise DataError(f"{printable(root)}: no images fall in the {split} split{way_out}")
    for path in not_files:
        logging.warning("Skipping %s: %s", printable(path), guard.REASONS[guard.NOT_A_FILE])
    # The names' own bytes: TensorFlow would encode a str as UTF-8, which a name need not be.
    names = [os.fsencode(f) for f in files]
    labels = np.asarray(labels, np.int32)
    jpeg_only = all(f.lower().endswith((".jpg", ".jpeg")) for f in files)
    info = DatasetInfo(f"folder:{root}", SourceKind.FOLDER, classes, 3, None, len(files),
                       jpeg_only=jpeg_only, not_files=not_files, held_out=held_out)

    def items(**_):
        return tf.data.Dataset.from_tensor_slices((tf.constant(names, tf.string), labels))

    return info, items


def _prepared_split(directory, split):
    description = read_prepared(directory)
    splits = description["splits"]
    if split not in splits:
        raise DataError(f"{directory} has splits {sorted(splits)}, not {split!r}")
    expected = splits[split]["shards"]
    files = [os.path.join(directory, name) for name in expected]
    missing = [name for name, path in zip(expected, files) if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{directory}: {len(missing)} of the {len(expected)} {split} shards "
                        f"that dataset.json lists are missing, e.g. {missing[0]}")
    info = DatasetInfo(f"prepared:{directory}", SourceKind.PREPARED, description["class_names"],
                       3, None, splits[split]["records"], jpeg_only=True, prepared=description)
    return info, lambda **_: tf.data.Dataset.from_tensor_slices(files)


def _tfrecord_split(pattern, split, num_classes):
    if "{split}" in pattern:
        pattern = pattern.replace("{split}", split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise DataError(f"{pattern}: no TFRecord files match")
    if num_classes is None:
        raise DataError("tfrecord datasets need --num_classes (labels carry no class names)")
    names = [str(i) for i in range(num_classes)]
    info = DatasetInfo(f"tfrecord:{pattern}", SourceKind.TFRECORD, names, 3)
    return info, lambda **_: tf.data.Dataset.from_tensor_slices(files)


# Each kind of --dataset (flag_facts.SOURCE_KINDS) and the reader of its splits:
# reader(source, split) -> (DatasetInfo, items).
READERS = {
    "tfds": lambda source, split: _tfds_split(source.arg, split, source.data_dir),
    "tfrecord": lambda source, split: _tfrecord_split(source.arg, split, source.num_classes),
    "folder": lambda source, split: _folder_split(source.arg, split),
    "prepared": lambda source, split: _prepared_split(source.arg, split),
    # The IDX datasets (IDX_DIRS), each read from the directory of its own name.
    **dict.fromkeys(IDX_DIRS, lambda source, split: _idx_split(
        source.kind, source.arg, split, source.data_dir)),
}
