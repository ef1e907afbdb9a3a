"""Data sources and the tf.data input pipeline.

`make_dataset(source, split, training, ...)` is the one entry point. `source` is a string that
fits in a flag:
    tfds:<name>          any TFDS image-classification dataset (imagenet2012 needs a manual dir)
    tfrecord:<glob>      ImageNet-style shards (image/encoded, image/class/label); a "{split}" in
                         the glob is replaced by the split name (train, validation)
    prepared:<dir>       the output of prepare.py: 256 x 256 JPEG shards, cropped without resizing
    folder:<path>        one sub-directory per class of JPEG/PNG files; train/ and val/ sub-trees
                         when present, otherwise a seeded 90/10 split
    fashion_mnist[:<dir>], mnist[:<dir>]
                         IDX .gz files (default: Debian's dataset-fashion-mnist location); TFDS
                         when the files are absent
"""

import dataclasses
import enum
import functools
import gzip
import hashlib
import json
import os
import socket
import sys

import numpy as np
import tensorflow as tf
from absl import logging

from alexnet_tf import guard, preprocessing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IDX_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FOLDER_VAL_FRACTION = 0.1
# prepare.py's description of a prepared directory (classes, records, PCA), beside its shards.
PREPARED_DESCRIPTION = "dataset.json"
PREPARED_FORMAT = "alexnet_tf prepared v1"
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "validation"}


class DataError(ValueError):
    """A user-facing data problem (missing path, empty folder, bad label); one-line message."""


class SourceKind(enum.Enum):
    """How a source's records are read: decoded arrays in memory (IDX), a TFDS dataset, or files
    of encoded images (a folder tree, TFRecord shards, prepare.py's shards) that load_source reads
    in parallel."""

    IDX = "idx"
    TFDS = "tfds"
    FOLDER = "folder"
    TFRECORD = "tfrecord"
    PREPARED = "prepared"


@dataclasses.dataclass
class DatasetInfo:
    """What the rest of the project needs to know about a source.

    Attributes:
        source: the source string.
        kind: how its records are read.
        class_names: label names, index = label.
        channels: 1 or 3.
        image_size: native (height, width) when every image has it (MNIST, CIFAR), else None.
        num_examples: examples in the split read, or None when unknown without a full pass.
        skipped: a tf.Variable counting the images skipped so far (file sources): unreadable ones
            and those over the pixel budget (`PreprocessConfig.max_pixels`).
        jpeg_only: every record is named as a JPEG (folder sources with only .jpg/.jpeg files,
            prepared sources): the pipeline decodes with no format branch and skips and counts any
            that is not.
        prepared: a prepared source's description (prepare.py's dataset.json), else None.
        skips_on_workers: the pipeline runs on tf.data service workers, whose `skipped` never
            reaches this process: each worker logs the images it skips instead (`_count_skipped`).
        not_files: folder entries named as images that are no readable file (a broken link, a
            directory): left out of the records, and counted in `skipped` once.
    """

    source: str
    kind: SourceKind
    class_names: list
    channels: int
    image_size: tuple | None = None
    num_examples: int | None = None
    skipped: tf.Variable | None = None
    jpeg_only: bool = False
    prepared: dict | None = None
    skips_on_workers: bool = False
    not_files: tuple = ()

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def small_images(self):
        return self.image_size is not None and max(self.image_size) <= 64


def parse_source(source):
    """Splits "kind:arg" and validates the kind; returns (kind, arg or None)."""
    kind, _, arg = source.partition(":")
    if kind not in ("tfds", "tfrecord", "folder", "prepared", "fashion_mnist", "mnist"):
        raise DataError(
            f"unknown dataset {source!r}: use tfds:<name>, tfrecord:<glob>, folder:<path>, "
            "prepared:<dir>, fashion_mnist[:<dir>] or mnist[:<dir>]"
        )
    if kind in ("tfds", "tfrecord", "folder", "prepared") and not arg:
        raise DataError(f"dataset {source!r} needs a value after '{kind}:'")
    return kind, arg or None


def _canonical_split(split):
    return SPLIT_ALIASES.get(split, split)


# --------------------------------------------------------------------------------------------
# Sources. Each returns (dataset, DatasetInfo): records (image, label, origin) for IDX and TFDS,
# where `image` is a uint8 [H, W, C] tensor (or encoded bytes from TFDS); for folders and
# TFRecords the files, which load_source reads into such records with encoded bytes. `origin`
# names the file a record came from, for error messages.


def read_idx(path):
    """Reads one IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, expected {expected})")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_source(kind, directory, split, data_dir, **unused):
    del unused
    directory = directory or IDX_DIRS[kind]
    split = {"validation": "test"}.get(split, split)
    if split not in IDX_FILES:
        raise DataError(f"{kind} has splits train and test, not {split!r}")
    images_path, labels_path = (os.path.join(directory, f) for f in IDX_FILES[split])
    if not os.path.exists(images_path):
        if directory != IDX_DIRS[kind]:
            raise DataError(f"{images_path} not found")
        logging.info("%s not found; falling back to TFDS %s", images_path, kind)
        return _tfds_source(kind, split, data_dir, decode=True)
    images, labels = read_idx(images_path)[..., None], read_idx(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels")
    names = FASHION_MNIST_CLASSES if kind == "fashion_mnist" else tuple(str(i) for i in range(10))
    if labels.max() >= len(names):
        raise DataError(f"{labels_path}: label {labels.max()} outside [0, {len(names)})")
    info = DatasetInfo(f"{kind}:{directory}", SourceKind.IDX, list(names), 1, images.shape[1:3],
                       len(images))
    origin = tf.constant(images_path)
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    return ds.map(lambda x, y: (x, y, origin)), info


def _tfds_source(name, split, data_dir, decode=False, training=False, seed=None,
                 input_context=None, **unused):
    del unused
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
    read_config = tfds.ReadConfig(shuffle_seed=seed, input_context=input_context)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=training,
        read_config=read_config,
        decoders=None if decode else {"image": tfds.decode.SkipDecoding()},
    )
    origin = tf.constant(f"tfds:{name}/{split}")
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32), origin))
    size = tuple(shape[:2]) if None not in shape[:2] else None
    info = DatasetInfo(
        f"tfds:{name}", SourceKind.TFDS, list(features["label"].names), shape[-1] or 3, size,
        splits[split].num_examples if split in splits else None,
    )
    return ds, info


def _list_class_folders(root):
    """(class names, files, labels) of a tree of one folder per class. A run reads its training
    split several times (its description, the pipeline, the TensorBoard sample, the PCA sample):
    the listing is kept and read again only when a class folder's modification time changes."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class sub-directories (expected one folder per class)")
    stamps = tuple(os.stat(os.path.join(root, name)).st_mtime_ns for name in classes)
    files, labels, not_files = _class_folder_files(root, tuple(classes), stamps)
    return classes, list(files), list(labels), not_files


@functools.lru_cache(maxsize=16)
def _class_folder_files(root, classes, stamps):
    """(files, labels, entries named as images that are no regular file). Names are kept as the
    filesystem gives them: one that is not UTF-8 is a str with surrogate escapes (os.fsencode
    gives its bytes back)."""
    del stamps  # part of the cache key only
    files, labels, not_files = [], [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        with os.scandir(folder) as entries:
            named = sorted((e for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)),
                           key=lambda e: e.name)
        if not named:
            raise DataError(f"{folder}: class folder has no .jpg/.jpeg/.png files")
        # is_file() follows links: a broken link or a directory named .jpg is no image.
        images = [e.path for e in named if e.is_file()]
        not_files += [e.path for e in named if not e.is_file()]
        files += images
        labels += [label] * len(images)
    return tuple(files), tuple(labels), tuple(not_files)


def _in_validation_split(path):
    # Stable across runs and machines: a hash of the file name's bytes (as the filesystem holds
    # them, UTF-8 or not), not of the listing order.
    digest = hashlib.md5(os.fsencode(os.path.basename(path))).digest()
    return digest[0] < 256 * FOLDER_VAL_FRACTION


def printable(path):
    """A file name fit for a message: bytes that are not UTF-8 shown as \\x escapes."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _folder_source(root, split, training=False, seed=None, **unused):
    del unused
    sub = {"train": "train", "validation": "val"}.get(split)
    if sub is None:
        raise DataError(f"folder datasets have splits train and validation, not {split!r}")
    if os.path.isdir(os.path.join(root, "train")):
        split_root = os.path.join(root, sub)
        if sub == "val" and not os.path.isdir(split_root):
            split_root = os.path.join(root, "validation")
        classes, files, labels, not_files = _list_class_folders(split_root)
    else:
        classes, files, labels, not_files = _list_class_folders(root)
        keep = [_in_validation_split(f) == (split == "validation") for f in files]
        files = [f for f, k in zip(files, keep) if k]
        labels = [y for y, k in zip(labels, keep) if k]
        not_files = tuple(f for f in not_files if
                          _in_validation_split(f) == (split == "validation"))
        if not files and not not_files:
            raise DataError(f"{root}: no images fall in the {split} split")
    for path in not_files:
        logging.warning("Skipping %s: %s", printable(path), guard.REASONS[guard.NOT_A_FILE])
    # The names' own bytes: TensorFlow would encode a str as UTF-8, which a name need not be.
    files_ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant([os.fsencode(f) for f in files], tf.string), np.asarray(labels, np.int32)))
    jpeg_only = all(f.lower().endswith((".jpg", ".jpeg")) for f in files)
    info = DatasetInfo(f"folder:{root}", SourceKind.FOLDER, classes, 3, None, len(files),
                       jpeg_only=jpeg_only, not_files=not_files)
    return files_ds, info


def read_prepared(directory):
    """A prepared directory's description (prepare.py's dataset.json); DataError if it is not
    one."""
    path = os.path.join(directory, PREPARED_DESCRIPTION)
    if not os.path.isfile(path):
        raise DataError(f"{directory}: no {PREPARED_DESCRIPTION}; not a prepared directory "
                        "(prepare.py writes one, and finishes it last)")
    try:
        with open(path) as f:
            description = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if description.get("format") != PREPARED_FORMAT:
        raise DataError(f"{path}: not written by this version of prepare.py "
                        f"(format {description.get('format')!r}, expected {PREPARED_FORMAT!r})")
    return description


def _prepared_source(directory, split, **unused):
    del unused
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
    return tf.data.Dataset.from_tensor_slices(files), info


_EXAMPLE_KEYS = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def parse_examples(records, one_based_labels=False):
    """(encoded images, int32 labels) of one serialized tf.train.Example or a vector of them."""
    parse = tf.io.parse_single_example if records.shape.rank == 0 else tf.io.parse_example
    features = parse(records, _EXAMPLE_KEYS)
    label = tf.cast(features["image/class/label"], tf.int32) - int(one_based_labels)
    return features["image/encoded"], label


def _tfrecord_source(pattern, split, num_classes=None, one_based_labels=False, **unused):
    del unused
    if "{split}" in pattern:
        pattern = pattern.replace("{split}", split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise DataError(f"{pattern}: no TFRecord files match")
    if num_classes is None:
        raise DataError("tfrecord datasets need --num_classes (labels carry no class names)")
    names = [str(i) for i in range(num_classes)]
    info = DatasetInfo(f"tfrecord:{pattern}", SourceKind.TFRECORD, names, 3)
    return tf.data.Dataset.from_tensor_slices(files), info


# --------------------------------------------------------------------------------------------
# The pipeline


def load_source(source, split, data_dir=None, training=False, seed=None, input_context=None,
                num_classes=None, one_based_labels=False, parallel_reads=tf.data.AUTOTUNE,
                deterministic=False, order_seed=None, serialized=False):
    """Reads a split as (image, label, origin) records, before any preprocessing.

    `order_seed` (not training): a folder tree's files in one fixed pseudo-random order, the same
    in every iterator, instead of class by class (prepare.py writes its shards in that order).
    `serialized`: TFRecord and prepared sources yield the serialized tf.train.Example strings,
    for parsing per batch (`parse_examples`).

    Returns:
        (dataset, DatasetInfo). File sources are sharded by file under `input_context`.
    """
    kind, arg = parse_source(source)
    split = _canonical_split(split)
    kwargs = dict(training=training, seed=seed, input_context=input_context)
    if kind in ("fashion_mnist", "mnist"):
        ds, info = _idx_source(kind, arg, split, data_dir)
    elif kind == "tfds":
        ds, info = _tfds_source(arg, split, data_dir, **kwargs)
    elif kind == "folder":
        ds, info = _folder_source(arg, split, **kwargs)
    elif kind == "prepared":
        ds, info = _prepared_source(arg, split)
        one_based_labels = False  # prepare.py writes labels from 0
    else:
        ds, info = _tfrecord_source(arg, split, num_classes, one_based_labels)

    sharded_by_tfds = info.kind is SourceKind.TFDS and input_context is not None
    if input_context is not None and input_context.num_input_pipelines > 1 and not sharded_by_tfds:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if info.kind is SourceKind.FOLDER:
        if training or order_seed is not None:
            ds = ds.shuffle(info.num_examples, seed=seed if training else order_seed,
                            reshuffle_each_iteration=training)
        ds = ds.map(lambda path, label: (tf.io.read_file(path), label, path),
                    num_parallel_calls=parallel_reads, deterministic=deterministic)
    elif info.kind in (SourceKind.TFRECORD, SourceKind.PREPARED):
        if training:
            ds = ds.shuffle(1024, seed=seed, reshuffle_each_iteration=True)
        if serialized:
            read = tf.data.TFRecordDataset
        else:
            def read(path):
                return tf.data.TFRecordDataset(path).map(
                    lambda r: (*parse_examples(r, one_based_labels), path))
        ds = ds.interleave(read, cycle_length=16, num_parallel_calls=parallel_reads,
                           deterministic=deterministic)
    return ds, info


def _through_guard(source, split, max_pixels, decode, stand_in, **source_args):
    """A split's records, in load_source's order, as (status, value) through the guard: value
    is `decode(encoded bytes)` of an image that passes it, else `stand_in`; decoded arrays (IDX)
    pass as they are. Returns (that iterator, guard.Skips of the entries the listing left
    out). What the split check and the PCA sample both read."""
    ds, info = load_source(source, split, deterministic=True, **source_args)
    skips = guard.Skips({guard.NOT_A_FILE: len(info.not_files)})
    if ds.element_spec[0].dtype != tf.string:  # decoded arrays: every record is an image
        records = ds.map(lambda image, label, origin: (guard.OK, image))
    else:
        # The pipeline's own rule (info.jpeg_only) decides, so that both see what training sees.
        records = guard.decoded_or_skipped(
            ds, image_of=lambda image, label, origin: image,
            decode=lambda image, label, origin: (decode(image),),
            stand_in=lambda *_: (stand_in,), max_pixels=max_pixels, jpeg_only=info.jpeg_only,
            parallel=os.cpu_count())
    return records.as_numpy_iterator(), skips, info


def saved_source_args(settings):
    """load_source's arguments other than the source, from a run's saved config.json (`settings`,
    the dict): what the pictures and the int8 calibration read a finished run's data with."""
    return dict(data_dir=settings.get("data_dir"), num_classes=settings.get("num_classes"),
                one_based_labels=settings.get("one_based_labels", False))


def check_split(source, split, needed, what, max_pixels, **source_args):
    """DataError unless `split` holds at least `needed` images that pass the guard and decode,
    read in order until that many are found: a run that would stop for want of images stops
    before it starts, saying why. `what` names what needs them ("one training batch
    (--batch_size=4)"); `source_args` are load_source's."""
    # Decoded, not only checked: a split of files damaged inside would pass every check of the
    # bytes, and a repeating pipeline would then wait for ever for its first image.
    records, skips, info = _through_guard(
        source, split, max_pixels, lambda image: tf.size(preprocessing.decode(image, 3)), 0,
        **source_args)
    found = readable = 0
    for code, _ in records:
        found += 1
        if code == guard.OK:
            readable += 1
            if readable >= needed:
                return
        else:
            skips[int(code)] += 1
    raise DataError(
        f"{printable(info.source)}: the {split} split has {readable} readable image(s) of "
        f"{found + len(info.not_files)} file(s), fewer than the {needed} that {what} needs; "
        f"skipped: {skips.describe()}")


def decoded_sample(source, count, max_pixels, **source_args):
    """Up to `count` training images through the guard, decoded to RGB float32 in [0, 255], in
    the order load_source reads them: (images, guard.Skips of those left out)."""
    records, skips, _ = _through_guard(
        source, "train", max_pixels, lambda image: preprocessing.decode(image, 3),
        tf.zeros([0, 0, 3]), **source_args)
    images = []
    for code, image in records:
        if code != guard.OK:
            skips[int(code)] += 1
            continue
        images.append(image)
        if len(images) == count:
            break
    return images, skips


def _check_label(image, label, origin, num_classes):
    # Works on one record or a batch; a batch names its first bad record.
    ok = tf.logical_and(label >= 0, label < num_classes)
    bad = tf.argmin(tf.cast(tf.reshape(ok, [-1]), tf.int32))
    check = tf.debugging.Assert(
        tf.reduce_all(ok),
        [f"label outside [0, {num_classes}) in", tf.gather(tf.reshape(origin, [-1]), bad),
         "label:", tf.gather(tf.reshape(label, [-1]), bad)])
    with tf.control_dependencies([check]):
        return image, tf.identity(label), origin


def default_preprocess_config(info, variant_image_size, image_size=None):
    """The PreprocessConfig a source needs: paper crops for photos, pad-crop for small images."""
    channels = info.channels
    if info.small_images:
        size = image_size or info.image_size[0]
        mean, std = {
            "fashion_mnist": preprocessing.FASHION_MNIST_MEAN_STD,
            "mnist": preprocessing.MNIST_MEAN_STD,
        }.get(info.source.split(":")[0], (127.5, 127.5))
        return preprocessing.PreprocessConfig(
            image_size=size, resize_size=size, channels=channels,
            mean=(mean,) * channels, std=(std,) * channels,
            crop="pad", pad=size // 8,
            flip=not info.source.startswith(("mnist", "tfds:mnist")),
        )
    size = image_size or variant_image_size
    resize_size = preprocessing.resize_size_for(size)
    if info.prepared is not None:
        # Crops are cut at the stored scale: the shorter side is already the resize_size.
        resize_size = info.prepared["resolution"]
        if size > resize_size:
            raise DataError(f"{info.source}: {size}-pixel crops do not fit its "
                            f"{resize_size}-pixel images")
    mean = preprocessing.IMAGENET_MEAN if channels == 3 else (sum(preprocessing.IMAGENET_MEAN) / 3,)
    return preprocessing.PreprocessConfig(
        image_size=size, resize_size=resize_size,
        channels=channels, mean=mean, std=(1.0,) * channels,
    )


def make_dataset(
    source,
    split,
    training,
    batch_size,
    preprocess,
    data_dir=None,
    seed=None,
    deterministic=None,
    cache=False,
    shuffle_buffer=10_000,
    repeat=False,
    ten_crop=False,
    num_classes=None,
    one_based_labels=False,
    input_context=None,
    autotune=False,
    device_stage=False,
    data_service=None,
    order_seed=None,
):
    """Builds the batched, preprocessed tf.data pipeline for one split.

    Args:
        source: see the module docstring.
        split: "train", "validation" (or "test").
        training: training augmentation and shuffling when True, evaluation views otherwise.
        batch_size: batch size of this pipeline (per replica group under `input_context`).
        preprocess: a `preprocessing.PreprocessConfig` (see `default_preprocess_config`).
        data_dir: TFDS data directory.
        seed: seeds shuffling and augmentation; with a seed the pipeline is deterministic.
        deterministic: override of the element order guarantee (default: True for evaluation,
            so predictions line up with the records, and for seeded training).
        cache: cache decoded records in memory (small datasets).
        shuffle_buffer: records in the shuffle buffer.
        repeat: repeat forever (use with steps_per_epoch).
        ten_crop: evaluation yields [10, H, W, C] per image (paper §4.1).
        num_classes: labels must lie in [0, num_classes); defaults to the source's class count.
        one_based_labels: TFRecord labels start at 1 (tensorflow/models' ImageNet scripts).
        input_context: a `tf.distribute.InputContext`; shards the files per input pipeline.
        autotune: run tf.data's autotuning thread. Off by default: in TensorFlow 2.21 an
            iterator's destruction waits for that thread's next wake-up, which comes at
            doublings of 10 ms up to 60 s after the iterator's creation; Keras destroys the
            validation iterator every epoch, so each epoch waits (BENCHMARKS.md gives the cost).
            Without it, parallel stages run one call per core and prefetch buffers grow on
            demand, at the same measured throughput.
        device_stage: stop at uint8 crops (ten-crop: [B, 10, H, W, C]); the caller runs
            `preprocessing.InputStage(preprocess)` on each batch on its device (flip and PCA
            lighting in training, normalisation), as train.py does. Default: the host does
            everything and the batches are float32 model inputs.
        data_service: "grpc://HOST:PORT" of a tf.data service dispatcher (training only): the
            pipeline runs on its workers in distributed_epoch mode (each file goes to one worker
            per epoch) and this process receives the batches; with `repeat`, epoch after epoch.
            Every batch is kept, the last of each worker's share too, so that an epoch delivers
            every record once. The workers print the images they skip; `info.skipped` does
            not count them.
        order_seed: evaluation of a folder tree in one fixed pseudo-random file order instead
            of class by class (load_source), for a sample of a split's first images.

    Returns:
        (dataset of (images, labels), DatasetInfo).
    """
    if deterministic is None:
        deterministic = seed is not None or not training
    # Prepared training data is parsed, checked and cropped per batch (_prepared_training).
    batched_crops = training and parse_source(source)[0] == "prepared"
    ds, info = load_source(source, split, data_dir, training, seed, input_context, num_classes,
                           one_based_labels, deterministic=deterministic, order_seed=order_seed,
                           serialized=batched_crops)
    num_classes = num_classes or info.num_classes
    if preprocess.channels != info.channels and info.channels is not None:
        logging.info("Converting %d-channel images of %s to %d channels",
                     info.channels, source, preprocess.channels)
    if preprocess.channels == 1 and training:
        logging.info("One-channel images: PCA lighting is off (it is defined on RGB)")

    info.skipped = tf.Variable(len(info.not_files), dtype=tf.int64, trainable=False,
                               name="skipped_images")
    info.skips_on_workers = bool(data_service)
    encoded = batched_crops or ds.element_spec[0].dtype == tf.string
    if encoded and not batched_crops:
        ds = ds.filter(_readable(info, preprocess))
    if cache:
        ds = ds.cache()
    # Folder sources are read in a fresh random file order each epoch (load_source): shuffling
    # their bytes again would only hold shuffle_buffer encoded images in memory. A cache replays
    # one order, so cached records are shuffled after it.
    if training and (cache or info.kind is not SourceKind.FOLDER):
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat and not data_service:  # the service repeats whole jobs (_through_service)
        ds = ds.repeat()

    if batched_crops:
        ds = _prepared_training(ds, info, preprocess, batch_size, seed, deterministic,
                                num_classes, device_stage, drop_remainder=not data_service)
        if data_service:
            ds = _through_service(ds, data_service, repeat)
        return _with_options_and_prefetch(ds, deterministic, autotune, input_context), info
    if ten_crop and not training:
        per_example, per_batch = _ten_crop_steps(preprocess, device_stage)
    elif info.kind is SourceKind.PREPARED:
        per_example, per_batch = _prepared_steps(preprocess, device_stage)
    elif not training:
        per_example, per_batch = _evaluation_steps(preprocess, info.jpeg_only, device_stage)
    elif not encoded and preprocess.crop == "pad":
        per_example, per_batch = _small_image_training_steps(preprocess, device_stage)
    else:
        per_example, per_batch = _photo_training_steps(preprocess, info.jpeg_only, device_stage)
    ds = _apply(ds, per_example, seed, deterministic)
    # Backstop for corrupt data that passes the header/trailer check (e.g. garbage mid-file).
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=training and not data_service,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # After ignore_errors, so that a bad label stops the run with its file named; on whole
    # batches, as a per-record map would be one more sequential stage per image.
    ds = ds.map(lambda x, y, o: _check_label(x, y, o, num_classes)[:2])
    ds = _apply(ds, per_batch, seed, deterministic)
    if data_service:
        ds = _through_service(ds, data_service, repeat)
    return _with_options_and_prefetch(ds, deterministic, autotune, input_context), info


def _through_service(ds, address, repeat, compression=None):
    """`ds` run by the tf.data service's workers, one epoch per job (distributed_epoch: the
    dispatcher hands each file to one worker), repeated here when asked: every repetition
    starts a new job over all the files.

    `compression`: of each batch on the wire, "AUTO" or None. None: compressing uint8 crops
    saves 14-19% of the bytes and triples the trainer's CPU time per image (BENCHMARKS.md,
    "tf.data service"), and the trainer's CPU is what the service relieves."""
    host, port = address.removeprefix("grpc://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise DataError(f"no tf.data service dispatcher answers at {address}: {e}") from None
    ds = ds.apply(tf.data.experimental.service.distribute(
        processing_mode="distributed_epoch", service=address, compression=compression))
    return ds.repeat() if repeat else ds


def _with_options_and_prefetch(ds, deterministic, autotune, input_context):
    """The pipeline's options, and a prefetch buffer at its end."""
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = autotune
    if input_context is not None and input_context.num_input_pipelines > 1:
        # Already sharded in load_source; stop tf.distribute from sharding a second time.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _prepared_training(ds, info, preprocess, batch_size, seed, deterministic, num_classes,
                       device_stage, drop_remainder=True):
    """make_dataset's training pipeline for prepared data, after the shuffle of the serialized
    records: batches of them, then one call per batch that parses them, drops and counts the
    incomplete images and decodes a random window of each of the others
    (preprocessing.prepared_random_crops). Per batch because a tf.data stage per record costs
    about as much as decoding its window (BENCHMARKS.md, "Input pipelines"). A batch that lost
    records to the check is that much smaller (and left out when none is left); one whose
    decoding fails past the check (damage inside a file) is dropped with tf.data's warning
    (ignore_errors). `drop_remainder=False` (through the tf.data service) keeps the last, short
    batch, padded with stand-ins while it is decoded."""
    stored = None if info.prepared.get("keep_frame") else info.prepared["resolution"]
    # Stands in for an incomplete image until its crop is dropped, so that the batch keeps its
    # size while it is decoded. At the stored size: its window is drawn for that size, and a
    # window outside it would fail the whole batch's decoding, real images too.
    side = stored or preprocess.resize_size
    stand_in = tf.io.encode_jpeg(tf.zeros([side, side, 3], tf.uint8))

    def crops(records, s):
        images, labels = parse_examples(records)
        ok = preprocessing.looks_complete(images)
        with tf.control_dependencies([_count_skipped(
                info, tf.reduce_sum(tf.cast(~ok, tf.int64)), info.source)]):
            images = tf.where(ok, images, stand_in)
        if not drop_remainder:  # the last, short batch: padded to the size the crops unroll to
            missing = batch_size - tf.size(labels)
            images = tf.ensure_shape(tf.concat([images, tf.fill([missing], stand_in)], 0),
                                     [batch_size])
            labels = tf.concat([labels, tf.zeros([missing], labels.dtype)], 0)
            ok = tf.concat([ok, tf.zeros([missing], tf.bool)], 0)
        crops = preprocessing.prepared_random_crops(images, s, preprocess, stored)
        return tf.cond(tf.reduce_all(ok), lambda: (crops, labels),
                       lambda: (tf.boolean_mask(crops, ok), tf.boolean_mask(labels, ok)))

    def check_labels(images, labels):
        # After ignore_errors, so that a bad label stops the run; the records name no file.
        origins = tf.fill(tf.shape(labels), info.source)
        return _check_label(images, labels, origins, num_classes)[:2]

    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = tf.data.Dataset.zip(ds, _seeds(seed)).map(crops, num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=deterministic)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.filter(lambda images, labels: tf.size(labels) > 0).map(check_labels)
    augment = _augmenter(preprocess, device_stage)
    return _apply(ds, augment, seed, deterministic)


# --------------------------------------------------------------------------------------------
# The pipeline's steps: what make_dataset maps over records and over batches


@dataclasses.dataclass(frozen=True)
class _Step:
    """A function of the images of each element: fn(images), or fn(images, seed) when seeded (a
    stateless [2] seed per element, fresh every epoch, reproducible given make_dataset's seed)."""

    fn: object
    seeded: bool = False


def _seeds(seed):
    """One stateless [2] seed per element: fresh draws every epoch, reproducible given `seed`."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _apply(ds, step, seed, deterministic):
    """Maps `step` over the first component (the images) of every element; None: no step."""
    if step is None:
        return ds
    if step.seeded:
        return tf.data.Dataset.zip(ds, _seeds(seed)).map(
            lambda element, s: (step.fn(element[0], s), *element[1:]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return ds.map(lambda images, *rest: (step.fn(images), *rest),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _readable(info, preprocess):
    """The filter of encoded records: whole JPEG or PNG files within the pixel budget. The budget
    is read from the header, so an oversized file costs no decoding. Those that fail are counted
    in info.skipped."""

    def readable(image, label, origin):
        ok = tf.equal(guard.status(image, preprocess.max_pixels, info.jpeg_only), guard.OK)
        with tf.control_dependencies([_count_skipped(info, tf.cast(~ok, tf.int64), origin)]):
            return tf.identity(ok)

    return readable


def _count_skipped(info, count, origin):
    """The op that adds `count` skipped images to info.skipped; on a tf.data service worker,
    where that variable is not the trainer's, it also prints them with their origin to the
    worker's stderr."""
    added = info.skipped.assign_add(count)
    if not info.skips_on_workers:
        return added
    logged = tf.cond(count > 0, lambda: tf.print(
        "alexnet_tf: skipped", count, "incomplete, oversized or non-JPEG image(s) of", origin,
        output_stream=sys.stderr), tf.no_op)
    return tf.group(added, logged)


def _channels_fitter(channels):
    """Decoded images converted to `channels` (encoded bytes are decoded to it later)."""

    def fit(image):
        if image.dtype == tf.string or image.shape[-1] == channels:
            return image
        if channels == 1:
            return tf.image.rgb_to_grayscale(image)
        return tf.image.grayscale_to_rgb(image)

    return fit


def _normalizer(preprocess, device_stage):
    """The per-batch step of evaluation: normalisation, or none when the device does it.
    Per batch because, per image, these small ops cost more than they do."""
    if device_stage:
        return None
    return _Step(tf.function(lambda images: preprocessing.normalize(images, preprocess),
                             jit_compile=True))


def _augmenter(preprocess, device_stage):
    """The per-batch step of training: flip, PCA lighting and normalisation, or none when the
    device does them (preprocessing.InputStage)."""
    if device_stage:
        return None
    # XLA fuses flip, lighting and normalisation into one pass over the batch: tf.data runs each
    # op of a map single-threaded, and op by op this stage was much slower
    # (benchmarks/input_pipeline.py --ablation).
    return _Step(tf.function(lambda images, s: preprocessing.augment_batch(images, s, preprocess),
                             jit_compile=True), seeded=True)


def _crops(fn, seeded, device_stage):
    """A step of `fn`, whose crops are float32 in [0, 255] (or uint8), rounded to uint8 for the
    device stage."""

    def cast(images):
        if not device_stage or images.dtype == tf.uint8:
            return images
        return preprocessing.to_uint8(images)

    if seeded:
        return _Step(lambda x, s: cast(fn(x, s)), seeded=True)
    return _Step(lambda x: cast(fn(x)))


def _ten_crop_steps(preprocess, device_stage):
    """(per record, per batch) for evaluation on the paper's ten crops (§4.1) of any source:
    decoded whole, the shorter side brought to resize_size (prepared data is already there and
    is not resampled), then the views; normalised per batch."""
    fit = _channels_fitter(preprocess.channels)

    def views(image):
        image = fit(image)
        if image.dtype == tf.string:
            image = preprocessing.decode(image, preprocess.channels)
        return preprocessing.ten_crop_views(image, preprocess)

    return _crops(views, False, device_stage), _normalizer(preprocess, device_stage)


def _evaluation_steps(preprocess, jpeg, device_stage):
    """(per record, per batch) for evaluation: the centre crop (JPEG decoding fused with it),
    normalised per batch."""
    fit = _channels_fitter(preprocess.channels)
    return (_crops(lambda image: preprocessing.eval_crop(fit(image), preprocess, jpeg=jpeg),
                   False, device_stage),
            _normalizer(preprocess, device_stage))


def _small_image_training_steps(preprocess, device_stage):
    """(per record, per batch) for training on same-size in-memory images (MNIST, CIFAR):
    padded, cropped, flipped and normalised as whole batches (only padded and cropped for the
    device stage)."""
    fit = _Step(_channels_fitter(preprocess.channels))
    if device_stage:
        return fit, _crops(lambda images, s: preprocessing.pad_crop_batch(images, s, preprocess),
                           True, device_stage)
    return fit, _Step(lambda images, s: preprocessing.train_batch(images, s, preprocess),
                      seeded=True)


def _photo_training_steps(preprocess, jpeg, device_stage):
    """(per record, per batch) for training on photos: each image's random crop (fused with
    JPEG decoding), then flip, PCA lighting and normalisation per batch."""
    fit = _channels_fitter(preprocess.channels)
    return (_crops(lambda image, s: preprocessing.random_crop(fit(image), s, preprocess,
                                                              jpeg=jpeg), True, device_stage),
            _augmenter(preprocess, device_stage))


def _prepared_steps(preprocess, device_stage):
    """(per record, per batch) for evaluating prepared data (prepare.py) on centre crops: the
    centre window decoded alone from the stored JPEG, never resampled; normalised per batch.
    (Training: _prepared_training; ten crops: _ten_crop_steps.)"""
    return (_Step(lambda x: preprocessing.prepared_center_crop(x, preprocess)),
            _normalizer(preprocess, device_stage))
