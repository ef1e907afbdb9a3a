"""The paper's 256 x 256 data, made once (paper §2), for `--dataset=prepared:DIR`.

`prepare(source, output_dir)` reads any photo source `make_dataset` accepts and writes, per split,
TFRecord shards `{split}-NNNNN-of-MMMMM` with tensorflow/models' ImageNet keys:

    image/encoded       JPEG of the image: shorter side rescaled to 256 (antialiased), then the
                        central 256 x 256 patch (or, with keep_frame, the whole rescaled frame)
    image/format        b"JPEG"
    image/height, image/width
    image/class/label   0-based
    image/class/text    the class name
    image/filename      where the image came from

and `dataset.json` (source_files.PREPARED_DESCRIPTION): class names, records and shards per
split, the source, the resolution, every file skipped and why, and the eigen-pairs of the
covariance of all training pixels (paper §4.1), accumulated in the same pass. dataset.json is
written last: a directory without it is unfinished.

Resumable: each shard is written under a temporary name, its statistics are saved beside it in
`.progress/`, and then it is renamed; a rerun keeps finished shards and redoes the rest. The
training split's records are put in a fixed pseudo-random order first (folder trees list their
images class by class), so a rerun writes the same records to the same shards.
"""

import dataclasses
import glob
import json
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf

from alexnet_tf import flag_facts, guard, pca, preprocessing, source_files, sources

RESOLUTION = 256  # paper §2
# JPEG quality of the prepared images: its error is below the PCA lighting's own shift, and
# fewer bytes decode faster (benchmarks/prepare_quality.py; BENCHMARKS.md, "Input pipelines").
DEFAULT_QUALITY = 90
RECORDS_PER_SHARD = 1024  # ImageNet's 1,281,167 training images: 1,252 shards
SPLITS = ("train", "validation")
ORDER_SEED = 20120  # the fixed order of the training records (any constant)
PROGRESS = ".progress"


class PrepareError(ValueError):
    """A user-facing problem with a prepare request; one-line message."""


@dataclasses.dataclass
class _Totals:
    """What a shard (or a split) holds, saved in .progress/ as each shard finishes."""

    records: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pixels: int = 0
    pixel_sum: list = dataclasses.field(default_factory=lambda: [0.0] * 3)
    pixel_products: list = dataclasses.field(default_factory=lambda: [[0.0] * 3] * 3)
    skipped: list = dataclasses.field(default_factory=list)

    def add(self, other):
        self.records += other.records
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.pixels += other.pixels
        self.pixel_sum = (np.add(self.pixel_sum, other.pixel_sum)).tolist()
        self.pixel_products = (np.add(self.pixel_products, other.pixel_products)).tolist()
        self.skipped += other.skipped

    def eigen_pairs(self):
        """Eigen-pairs of the covariance of every pixel counted, in [0, 1] (paper §4.1)."""
        mean = np.asarray(self.pixel_sum) / self.pixels
        covariance = np.asarray(self.pixel_products) / self.pixels - np.outer(mean, mean)
        return pca.eigen_pairs(covariance)


def _rescaled(image, keep_frame):
    """Paper §2: shorter side to RESOLUTION (antialiased: it is done once), then the central
    RESOLUTION square unless keep_frame; uint8."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.cast(tf.round(shape * RESOLUTION / tf.reduce_min(shape)), tf.int32)
    size = tf.maximum(size, RESOLUTION)  # rounding never leaves the shorter side at 255
    image = tf.image.resize(image, size, antialias=True)
    if not keep_frame:
        image = preprocessing.center_crop(image, RESOLUTION)
    return preprocessing.to_uint8(image)


def _convert(encoded, quality, keep_frame):
    """(JPEG bytes, height, width, pixel sum [3], pixel products [3, 3]) of one image that
    passed the guard; pixels in [0, 1], float64."""
    image = _rescaled(tf.io.decode_image(encoded, channels=3, expand_animations=False),
                      keep_frame)
    flat = tf.reshape(tf.cast(image, tf.float64) / 255.0, [-1, 3])
    return (tf.io.encode_jpeg(image, quality=quality), tf.shape(image)[0],
            tf.shape(image)[1], tf.reduce_sum(flat, 0), tf.matmul(flat, flat, transpose_a=True))


def _not_converted():
    """What stands in for a skipped image's _convert: nothing written, nothing counted. (A
    function: tensors made at import would start TensorFlow before a run sets its devices.)"""
    return b"", 0, 0, tf.zeros([3], tf.float64), tf.zeros([3, 3], tf.float64)


def _example(jpeg, height, width, label, class_name, filename):
    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": feature(jpeg),
        "image/format": feature(b"JPEG"),
        "image/height": feature(height),
        "image/width": feature(width),
        "image/class/label": feature(label),
        "image/class/text": feature(class_name.encode()),
        "image/filename": feature(os.fsencode(filename)),
    })).SerializeToString()


def _shard_names(split, count):
    return [f"{split}-{i:05d}-of-{count:05d}" for i in range(count)]


def _write_json(path, value):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def _finished_shard(output_dir, name):
    """The saved totals of a finished shard, or None."""
    stats = os.path.join(output_dir, PROGRESS, f"{name}.json")
    if not (os.path.isfile(os.path.join(output_dir, name)) and os.path.isfile(stats)):
        return None
    with open(stats) as f:
        return _Totals(**json.load(f))


def _count(ds):
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


class _Progress:
    """One line every `every` seconds: images done, img/s, MB read, ETA."""

    def __init__(self, split, total, done, out, every=5.0):
        self.split, self.total, self.done, self.out, self.every = split, total, done, out, every
        self.start = self.last = time.perf_counter()
        self.start_done = done
        self.bytes_in = 0

    def update(self, done, bytes_in, final=False):
        self.done, self.bytes_in = done, self.bytes_in + bytes_in
        now = time.perf_counter()
        if not final and now - self.last < self.every:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"prepare {self.split}: {self.done:,}/{self.total:,} images "
              f"({self.done / max(self.total, 1):.0%}), {rate:.0f} img/s, "
              f"{self.bytes_in / 1e6 / max(now - self.start, 1e-9):.1f} MB/s read"
              + ("" if final else f", ETA {_duration(eta)}"), file=self.out, flush=True)


def _duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _prepare_split(source, split, output_dir, quality, keep_frame, records_per_shard,
                   max_pixels, data_dir, num_classes, one_based_labels, out, settings):
    training = split == "train"
    reader = sources.Source(source, data_dir, num_classes, one_based_labels)
    info = reader.info(split)
    ds = reader.records(split, deterministic=True, order_seed=ORDER_SEED if training else None)
    if info.kind is sources.SourceKind.IDX or info.small_images:
        raise PrepareError(f"{source} holds small images ({info.image_size}); train on it "
                           "directly, it needs no preparing")
    if info.kind is sources.SourceKind.PREPARED:
        raise PrepareError(f"{source} is prepared already")
    total = info.num_examples if info.num_examples is not None else _count(ds)
    names = _shard_names(split, max(1, math.ceil(total / records_per_shard)))
    class_names = sources.class_names_for(info.class_names, num_classes or info.num_classes)
    finished = {name: _finished_shard(output_dir, name) for name in names}
    todo = [i for i, name in enumerate(names) if finished[name] is None]
    if todo:
        os.makedirs(os.path.join(output_dir, PROGRESS), exist_ok=True)
        _write_json(_settings_path(output_dir), settings)
        _write_shards(ds, info, source, names, finished, todo[0] * records_per_shard, total,
                      records_per_shard, class_names, output_dir,
                      lambda encoded: _convert(encoded, quality, keep_frame), max_pixels,
                      _Progress(split, total, todo[0] * records_per_shard, out))
    split_totals = _Totals(skipped=[{"file": path, "reason": guard.REASONS[guard.NOT_A_FILE]}
                                    for path in info.not_files])
    for name in names:
        split_totals.add(finished[name])
    return names, class_names, split_totals


class _ShardWriter:
    """Writes records, which come in index order with gaps (records tf.data dropped), to the
    shards that are not finished yet; a shard is finished (its totals saved, then its file
    renamed into place) when the first index past it comes."""

    def __init__(self, names, finished, records_per_shard, output_dir):
        self.names, self.finished, self.per_shard = names, finished, records_per_shard
        self.output_dir = output_dir
        self.shard, self.writer, self.totals = None, None, None

    def enter(self, index):
        """Moves to the shard of `index`; True if that shard is being written."""
        shard = index // self.per_shard
        if shard != self.shard:
            self.close()
            self.shard = shard
            if self.finished[self.names[shard]] is None:
                self.writer = tf.io.TFRecordWriter(self._temporary())
                self.totals = _Totals()
        return self.writer is not None

    def close(self):
        if self.writer is None:
            return
        name = self.names[self.shard]
        self.writer.close()
        _write_json(os.path.join(self.output_dir, PROGRESS, f"{name}.json"),
                    dataclasses.asdict(self.totals))
        os.replace(self._temporary(), os.path.join(self.output_dir, name))
        self.finished[name] = self.totals
        self.writer = None

    def _temporary(self):
        return _temporary(self.output_dir, self.names[self.shard])


def _write_shards(ds, info, source, names, finished, first, total, records_per_shard,
                  class_names, output_dir, convert, max_pixels, progress):
    """Converts the records of `ds` from index `first` on, in parallel on every core, through
    the guard (a record it skips arrives with its reason), and writes them to the unfinished
    shards."""
    cores = os.cpu_count()

    def head(index, image, label, origin):
        return index, label, origin, tf.strings.length(image)

    converted = guard.decoded_or_skipped(
        ds.skip(first).enumerate(first).map(lambda index, record: (index, *record)),
        image_of=lambda index, image, label, origin: image,
        decode=lambda *x: (*head(*x), *convert(x[1])),
        stand_in=lambda *x: (*head(*x), *_not_converted()),
        max_pixels=max_pixels, parallel=cores)
    shards = _ShardWriter(names, finished, records_per_shard, output_dir)
    for status, index, label, origin, size, jpeg, height, width, psum, pprod in (
            converted.prefetch(2 * cores).as_numpy_iterator()):
        index, origin = int(index), os.fsdecode(origin)
        progress.update(index + 1, int(size))
        if not shards.enter(index):
            continue  # a shard a previous run finished
        totals = shards.totals
        totals.bytes_in += int(size)
        if status != guard.OK:
            name = origin if info.kind is sources.SourceKind.FOLDER else f"{origin} record {index}"
            totals.skipped.append({"file": name, "reason": guard.REASONS[int(status)]})
            continue
        filename = (os.path.relpath(origin, source.partition(":")[2])
                    if info.kind is sources.SourceKind.FOLDER else f"{origin}:{index}")
        shards.writer.write(_example(jpeg, int(height), int(width), int(label),
                                     class_names[int(label)], filename))
        totals.add(_Totals(records=1, bytes_out=len(jpeg), pixels=int(height) * int(width),
                           pixel_sum=psum, pixel_products=pprod))
    shards.close()
    progress.update(total, 0, final=True)


def _settings_path(output_dir):
    return os.path.join(output_dir, PROGRESS, "settings.json")


def _check_settings(output_dir, settings):
    """A rerun into a directory must use the settings its shards were made with
    (.progress/settings.json, saved before the first shard), or the finished shards would not
    match the rest."""
    if not os.path.isfile(_settings_path(output_dir)):
        return
    with open(_settings_path(output_dir)) as f:
        before = json.load(f)
    changed = [f"{key}={before.get(key)!r}" for key in settings if before.get(key) != settings[key]]
    if changed:
        raise PrepareError(f"{output_dir} holds shards made with {', '.join(changed)}: rerun "
                           "with the same settings to resume, or use another --output_dir")


def _temporary(output_dir, name):
    return os.path.join(output_dir, f".{name}.tmp")


def prepare(source, output_dir, data_dir=None, quality=DEFAULT_QUALITY, keep_frame=False,
            records_per_shard=RECORDS_PER_SHARD, max_pixels=flag_facts.MAX_PIXELS,
            num_classes=None, one_based_labels=False, splits=SPLITS, out=sys.stdout):
    """Converts `source` into the paper's 256 x 256 form in `output_dir` (see the module
    docstring) and returns the description it writes to dataset.json.

    Args:
        source: a photo source string of `data.make_dataset` (folder:, tfds:, tfrecord:).
        output_dir: created if needed; a rerun keeps the shards finished before.
        data_dir: TFDS data directory.
        quality: JPEG quality of the prepared images.
        keep_frame: keep the whole frame (shorter side 256) instead of the central square.
        records_per_shard: records per TFRecord shard.
        max_pixels: source images declaring more pixels are skipped (see preprocessing).
        num_classes, one_based_labels: for tfrecord: sources, as make_dataset takes them.
        splits: the splits to prepare.
        out: where progress lines go.
    """
    if not 1 <= quality <= 100:
        raise PrepareError(f"quality must lie in [1, 100], got {quality}")
    if records_per_shard < 1:
        raise PrepareError(f"records_per_shard must be positive, got {records_per_shard}")
    os.makedirs(output_dir, exist_ok=True)
    settings = {"source": source, "quality": quality, "keep_frame": keep_frame,
                "records_per_shard": records_per_shard, "max_pixels": max_pixels}
    _check_settings(output_dir, settings)
    description_path = os.path.join(output_dir, source_files.PREPARED_DESCRIPTION)
    if os.path.exists(description_path):
        os.remove(description_path)  # unfinished again until this run completes
    for stale in glob.glob(os.path.join(output_dir, ".*.tmp")):
        os.remove(stale)  # a shard a killed run was writing
    description = {
        "format": source_files.PREPARED_FORMAT,
        "source": source,
        "resolution": RESOLUTION,
        "keep_frame": keep_frame,
        "jpeg_quality": quality,
        "labels": "0-based",
        "splits": {},
    }
    train_totals = None
    for split in splits:
        names, class_names, totals = _prepare_split(
            source, split, output_dir, quality, keep_frame, records_per_shard, max_pixels,
            data_dir, num_classes, one_based_labels, out, settings)
        description["class_names"] = class_names
        description["splits"][split] = {
            "records": totals.records, "shards": names, "bytes_in": totals.bytes_in,
            "bytes_out": totals.bytes_out, "skipped": totals.skipped}
        if split == "train":
            train_totals = totals
        print(f"prepare {split}: {totals.records:,} records in {len(names)} shards, "
              f"{totals.bytes_in / 1e6:,.1f} MB in, {totals.bytes_out / 1e6:,.1f} MB out, "
              f"{len(totals.skipped)} skipped", file=out, flush=True)
    if train_totals is not None and train_totals.pixels:
        eigval, eigvec = train_totals.eigen_pairs()
        description["pca"] = {"eigval": eigval, "eigvec": eigvec, "pixels": train_totals.pixels}
    _write_json(description_path, description)
    return description
