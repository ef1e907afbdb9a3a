"""The tf.data input pipeline: one split of a `sources.Source` as batches of uint8 crops, which
`preprocessing_layers.InputStage` turns into model inputs on the model's device.

`make_dataset(source, split, training, batch_size, preprocess, options)` reads as its steps:
records → the check of their bytes → cache → shuffle → repeat → a route (`ROUTES`: cut each
image, batch, check the labels) → the tf.data service → prefetch. The host does only what must
be on the host: reading, decoding and cutting. `on_host(dataset, ...)` finishes the crops on the
host instead (flip, PCA lighting, normalisation), for callers that want model inputs from the
pipeline itself.
"""

import dataclasses
import socket
import sys

import tensorflow as tf
from absl import logging

from alexnet_tf import image_bytes, preprocessing, sources
from alexnet_tf.pipeline_steps import (apply, evaluation_steps, host_stage, photo_training_steps,
                                       prepared_evaluation_steps, readable_filter, seeds,
                                       small_image_training_steps, ten_crop_steps)
from alexnet_tf.sources import DataError, SourceKind


@dataclasses.dataclass(frozen=True)
class Options:
    """How make_dataset builds a pipeline, beyond what it reads and how it cuts the images.

    Attributes:
        seed: seeds shuffling and augmentation; with a seed the pipeline is deterministic.
        deterministic: override of the element order guarantee (default: True for evaluation,
            so predictions line up with the records, and for seeded training).
        cache: cache decoded records in memory (small datasets).
        shuffle_buffer: records in the shuffle buffer.
        repeat: repeat forever (use with steps_per_epoch).
        ten_crop: evaluation yields [10, H, W, C] per image (paper §4.1).
        input_context: a `tf.distribute.InputContext`; shards the files per input pipeline.
        autotune: run tf.data's autotuning thread. Off by default: in TensorFlow 2.21 an
            iterator's destruction waits for that thread's next wake-up, and Keras destroys the
            validation iterator every epoch, so each epoch would wait (BENCHMARKS.md, "Input
            pipelines", gives the cost). Without it, parallel stages run one call per core and
            prefetch buffers grow on demand, at the same measured throughput.
        data_service: "grpc://HOST:PORT" of a tf.data service dispatcher (training only): the
            pipeline runs on its workers in distributed_epoch mode (each file goes to one worker
            per epoch) and this process receives the batches; with `repeat`, epoch after epoch.
            Every batch is kept, the last of each worker's share too, so that an epoch delivers
            every record once. The workers print the images they skip; this process's count
            does not include them.
        order_seed: evaluation of a folder tree in one fixed pseudo-random file order instead
            of class by class (`Source.records`), for a sample of a split's first images.
        device: copy each batch to this device ahead of its use ("/gpu:0"), as the pipeline's
            last step, so that a training step does not wait for its batch's copy.
        batches: at most this many batches (evaluation of a split's first batches). The
            pipeline ends there, as Keras' calls of several steps need: given `steps` instead,
            they run every step of their last call, past it.
    """

    seed: int | None = None
    deterministic: bool | None = None
    cache: bool = False
    shuffle_buffer: int = 10_000
    repeat: bool = False
    ten_crop: bool = False
    input_context: object = None
    autotune: bool = False
    data_service: str | None = None
    order_seed: int | None = None
    device: str | None = None
    batches: int | None = None


class SkipCounter:
    """The images a pipeline skipped (unreadable, over the pixel budget, no file), counted in
    `count`, a tf.Variable; on tf.data service workers, where that variable is not the
    trainer's, each skip is also printed to the worker's stderr with its origin."""

    def __init__(self, already, on_workers=False):
        self.count = tf.Variable(already, dtype=tf.int64, trainable=False, name="skipped_images")
        self.on_workers = on_workers

    def add(self, count, origin):
        """The op that adds `count` skipped images of `origin`."""
        added = self.count.assign_add(count)
        if not self.on_workers:
            return added
        logged = tf.cond(count > 0, lambda: tf.print(
            "alexnet_tf: skipped", count, "incomplete, oversized or non-JPEG image(s) of", origin,
            output_stream=sys.stderr), tf.no_op)
        return tf.group(added, logged)


@dataclasses.dataclass(frozen=True)
class _Pipeline:
    """What every step of one make_dataset pipeline reads."""

    info: sources.DatasetInfo
    preprocess: preprocessing.PreprocessConfig
    training: bool
    batch_size: int
    num_classes: int
    options: Options
    skipped: SkipCounter


def make_dataset(source, split, training, batch_size, preprocess, options=Options()):
    """The batched tf.data pipeline of one split: uint8 crops [B, H, W, C] (ten crops:
    [B, 10, H, W, C]) and int labels. Run `preprocessing_layers.InputStage(preprocess)` on each
    batch on the model's device (`preprocessing_layers.run_input_stage` puts it in the model's
    steps), or `on_host` for model inputs from the pipeline.

    Args:
        source: a `sources.Source`, or a source string (module docstring of `sources`).
        split: "train", "validation" (or "test").
        training: training augmentation and shuffling when True, evaluation views otherwise.
        batch_size: batch size of this pipeline (per replica group under an input context).
        preprocess: a `preprocessing.PreprocessConfig` (`inputs.preprocess_config` decides one).
        options: an `Options`.

    Returns:
        (dataset of (images, labels), the tf.Variable counting the images skipped). Its length
        is known where nothing can be skipped (decoded arrays), and infinite when it repeats.
    """
    source = sources.as_source(source)
    p = _pipeline(source.info(split), preprocess, training, batch_size, options, source)
    options, route = p.options, _route(p)
    ds = source.records(split, training, options.seed, options.input_context,
                        options.deterministic, options.order_seed,
                        serialized=route == "prepared training")
    if p.info.encoded and route != "prepared training":
        ds = ds.filter(readable_filter(p))
    if options.cache:
        ds = ds.cache()
    # Folder sources are read in a fresh random file order each epoch (Source.records):
    # shuffling their bytes again would only hold shuffle_buffer encoded images in memory. A
    # cache replays one order, so cached records are shuffled after it.
    if training and (options.cache or p.info.kind is not SourceKind.FOLDER):
        ds = ds.shuffle(options.shuffle_buffer, seed=options.seed, reshuffle_each_iteration=True)
    if options.repeat and not options.data_service:  # the service repeats whole jobs
        ds = ds.repeat()
    ds = ROUTES[route](ds, p)
    if options.data_service:
        ds = _through_service(ds, options.data_service, options.repeat)
    return _finish_pipeline(ds, options), p.skipped.count


def on_host(dataset, preprocess, training, options=Options()):
    """`dataset` (make_dataset's uint8 crops) finished on the host: flip and PCA lighting in
    training, then normalisation, as `preprocessing_layers.InputStage` does on a device; float32
    model inputs. For pipelines whose consumer is not a model with the stage in its steps (a
    Keras model of one's own, the image grid, int8 calibration). `options`: its seed and
    determinism, as given to make_dataset."""
    options = _settled_order(options, training)
    return apply(dataset, host_stage(preprocess, training), options).prefetch(tf.data.AUTOTUNE)


def _settled_order(options, training):
    """`options` with the order of the elements settled: deterministic for evaluation and
    seeded training, unless the options say."""
    if options.deterministic is not None:
        return options
    return dataclasses.replace(options, deterministic=options.seed is not None or not training)


def _pipeline(info, preprocess, training, batch_size, options, source):
    """The facts every step of the pipeline reads, its order settled (`_settled_order`)."""
    options = _settled_order(options, training)
    p = _Pipeline(info, preprocess, training, batch_size, source.num_classes or info.num_classes,
                  options, SkipCounter(len(info.not_files), on_workers=bool(options.data_service)))
    _log_conversions(p)
    return p


def _route(p):
    """The name of the route (ROUTES) that cuts the images of pipeline `p`."""
    if p.training and p.info.kind is SourceKind.PREPARED:
        return "prepared training"
    if p.options.ten_crop and not p.training:
        return "ten crops"
    if p.info.kind is SourceKind.PREPARED:
        return "prepared evaluation"
    if not p.training:
        return "evaluation"
    if not p.info.encoded and p.preprocess.crop == "pad":
        return "small-image training"
    return "photo training"


def _log_conversions(p):
    if p.preprocess.channels != p.info.channels:
        logging.info("Converting %d-channel images of %s to %d channels",
                     p.info.channels, p.info.source, p.preprocess.channels)
    if p.preprocess.channels == 1 and p.training:
        logging.info("One-channel images: PCA lighting is off (it is defined on RGB)")


def _per_image(steps):
    """A route that cuts each record alone, then batches: `steps(p)` gives (per record, per
    batch) steps."""

    def route(ds, p):
        per_record, per_batch = steps(p)
        ds = apply(ds, per_record, p.options)
        if p.info.encoded:
            # Backstop for corrupt data that passes the header/trailer check (garbage mid-file).
            ds = ds.ignore_errors(log_warning=True)
        ds = ds.batch(p.batch_size, drop_remainder=p.training and not p.options.data_service,
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=p.options.deterministic)
        # After ignore_errors, so that a bad label stops the run with its file named; on whole
        # batches, as a per-record map would be one more sequential stage per image.
        ds = ds.map(lambda x, y, origins: (x, _checked_labels(y, origins, p.num_classes)))
        return apply(ds, per_batch, p.options)

    return route


def _prepared_training(ds, p):
    """The training route of prepared data, after the shuffle of the serialized records:
    batches of them, then one call per batch that parses them, drops and counts the incomplete
    images and decodes a random window of each of the others
    (image_bytes.prepared_random_crops). Per batch because a tf.data stage per record costs
    about as much as decoding its window (BENCHMARKS.md, "Input pipelines"). A batch that lost
    records to the check is that much smaller (and left out when none is left); one whose
    decoding fails past the check (damage inside a file) is dropped with tf.data's warning
    (ignore_errors). Through the tf.data service the last, short batch is kept, padded with
    stand-ins while it is decoded."""
    info, preprocess, batch_size = p.info, p.preprocess, p.batch_size
    drop_remainder = not p.options.data_service
    stored = None if info.prepared.get("keep_frame") else info.prepared["resolution"]
    # Stands in for an incomplete image until its crop is dropped, so that the batch keeps its
    # size while it is decoded. At the stored size: its window is drawn for that size, and a
    # window outside it would fail the whole batch's decoding, real images too.
    side = stored or preprocess.resize_size
    stand_in = tf.io.encode_jpeg(tf.zeros([side, side, 3], tf.uint8))

    def crops(records, s):
        images, labels = sources.parse_examples(records)
        ok = image_bytes.looks_complete(images)
        with tf.control_dependencies([p.skipped.add(tf.reduce_sum(tf.cast(~ok, tf.int64)),
                                                    info.source)]):
            images = tf.where(ok, images, stand_in)
        if not drop_remainder:  # the last, short batch: padded to the size the crops unroll to
            missing = batch_size - tf.size(labels)
            images = tf.ensure_shape(tf.concat([images, tf.fill([missing], stand_in)], 0),
                                     [batch_size])
            labels = tf.concat([labels, tf.zeros([missing], labels.dtype)], 0)
            ok = tf.concat([ok, tf.zeros([missing], tf.bool)], 0)
        crops = image_bytes.prepared_random_crops(images, s, preprocess, stored)
        return tf.cond(tf.reduce_all(ok), lambda: (crops, labels),
                       lambda: (tf.boolean_mask(crops, ok), tf.boolean_mask(labels, ok)))

    def check_labels(images, labels):
        # After ignore_errors, so that a bad label stops the run; the records name no file.
        origins = tf.fill(tf.shape(labels), info.source)
        return images, _checked_labels(labels, origins, p.num_classes)

    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = tf.data.Dataset.zip(ds, seeds(p.options.seed)).map(
        crops, num_parallel_calls=tf.data.AUTOTUNE, deterministic=p.options.deterministic)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.filter(lambda images, labels: tf.size(labels) > 0).map(check_labels)
    return ds


def _checked_labels(labels, origins, num_classes):
    """`labels`, once an assertion has checked that all lie in [0, num_classes); it names the
    origin of the first bad one."""
    ok = tf.logical_and(labels >= 0, labels < num_classes)
    bad = tf.argmin(tf.cast(ok, tf.int32))
    check = tf.debugging.Assert(
        tf.reduce_all(ok),
        [f"label outside [0, {num_classes}) in", tf.gather(origins, bad),
         "label:", tf.gather(labels, bad)])
    with tf.control_dependencies([check]):
        return tf.identity(labels)


def _through_service(ds, address, repeat, compression=None):
    """`ds` run by the tf.data service's workers, one epoch per job (distributed_epoch: the
    dispatcher hands each file to one worker), repeated here when asked: every repetition
    starts a new job over all the files.

    `compression`: of each batch on the wire, "AUTO" or None. None: compressing uint8 crops
    saves few bytes and costs the trainer several times its CPU time per image (BENCHMARKS.md,
    "tf.data service"), and the trainer's CPU is what the service relieves."""
    host, port = address.removeprefix("grpc://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise DataError(f"no tf.data service dispatcher answers at {address}: {e}") from None
    ds = ds.apply(tf.data.experimental.service.distribute(
        processing_mode="distributed_epoch", service=address, compression=compression))
    return ds.repeat() if repeat else ds


def _finish_pipeline(ds, options):
    """The pipeline's tf.data options, its endlessness when it repeats (ignore_errors leaves
    tf.data unsure of it), and a prefetch buffer at its end."""
    if options.repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    settings = tf.data.Options()
    settings.deterministic = options.deterministic
    settings.autotune.enabled = options.autotune
    context = options.input_context
    if context is not None and context.num_input_pipelines > 1:
        # Already sharded by Source.records; stop tf.distribute from sharding a second time.
        settings.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
    if options.batches:
        ds = ds.take(options.batches)
    ds = ds.with_options(settings).prefetch(tf.data.AUTOTUNE)
    if options.device:
        ds = ds.apply(tf.data.experimental.prefetch_to_device(options.device, buffer_size=2))
    return ds


# make_dataset's routes (_route chooses one): how each cuts and batches its images.
ROUTES = {
    "prepared training": _prepared_training,
    "ten crops": _per_image(ten_crop_steps),
    "prepared evaluation": _per_image(prepared_evaluation_steps),
    "evaluation": _per_image(evaluation_steps),
    "small-image training": _per_image(small_image_training_steps),
    "photo training": _per_image(photo_training_steps),
}
