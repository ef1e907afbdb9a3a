"""The steps of make_dataset's routes: what they map over each record and over each batch. Each
maker takes the pipeline's facts (data._Pipeline: the source's description, the
PreprocessConfig, the Options, the skip counter) and returns (per record, per batch) Steps."""

import dataclasses

import tensorflow as tf

from alexnet_tf import guard, image_bytes, preprocessing


@dataclasses.dataclass(frozen=True)
class Step:
    """A function of the images of each element: fn(images), or fn(images, seed) when seeded (a
    stateless [2] seed per element, fresh every epoch, reproducible given make_dataset's seed)."""

    fn: object
    seeded: bool = False


def seeds(seed):
    """One stateless [2] seed per element: fresh draws every epoch, reproducible given `seed`."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def apply(ds, step, options):
    """Maps `step` over the first component (the images) of every element; None: no step."""
    if step is None:
        return ds
    if step.seeded:
        return tf.data.Dataset.zip(ds, seeds(options.seed)).map(
            lambda element, s: (step.fn(element[0], s), *element[1:]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=options.deterministic)
    return ds.map(lambda images, *rest: (step.fn(images), *rest),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=options.deterministic)


def readable_filter(p):
    """The filter of encoded records: whole JPEG or PNG files within the pixel budget. The budget
    is read from the header, so an oversized file costs no decoding. Those that fail are
    counted."""

    def readable(image, label, origin):
        ok = tf.equal(guard.status(image, p.preprocess.max_pixels, p.info.jpeg_only), guard.OK)
        with tf.control_dependencies([p.skipped.add(tf.cast(~ok, tf.int64), origin)]):
            return tf.identity(ok)

    return readable


def _channels_fitter(channels):
    """Decoded images converted to `channels` (encoded bytes are decoded to it later)."""

    def fit(image):
        if image.dtype == tf.string or image.shape[-1] == channels:
            return image
        if channels == 1:
            return tf.image.rgb_to_grayscale(image)
        return tf.image.grayscale_to_rgb(image)

    return fit


def host_stage(preprocess, training):
    """The per-batch step that finishes uint8 crops on the host (data.on_host): flip, PCA
    lighting and normalisation in training, normalisation in evaluation; the same functions as
    preprocessing_layers.InputStage, which train.py runs on its device instead. XLA fuses them
    into one pass over the batch: tf.data runs each op of a map single-threaded, and op by op
    this stage was much slower (benchmarks/input_pipeline.py --ablation)."""
    if training:
        return Step(tf.function(
            lambda images, s: preprocessing.augment_batch(images, s, preprocess),
            jit_compile=True), seeded=True)
    return Step(tf.function(lambda images: preprocessing.normalize(images, preprocess),
                             jit_compile=True))


def _crops(fn, seeded):
    """A step of `fn`, whose crops are float32 in [0, 255] (or uint8), rounded to uint8: every
    route ends at uint8 crops."""

    def cast(images):
        return images if images.dtype == tf.uint8 else preprocessing.to_uint8(images)

    if seeded:
        return Step(lambda x, s: cast(fn(x, s)), seeded=True)
    return Step(lambda x: cast(fn(x)))


def ten_crop_steps(p):
    """(per record, per batch) for evaluation on the paper's ten crops (§4.1) of any source:
    decoded whole, the shorter side brought to resize_size (prepared data is already there and
    is not resampled), then the views."""
    preprocess = p.preprocess
    fit = _channels_fitter(preprocess.channels)

    def views(image):
        image = fit(image)
        if image.dtype == tf.string:
            image = image_bytes.decode(image, preprocess.channels)
        return preprocessing.ten_crop_views(image, preprocess)

    return _crops(views, False), None


def evaluation_steps(p):
    """(per record, per batch) for evaluation: the centre crop (JPEG decoding fused with it)."""
    preprocess, jpeg = p.preprocess, p.info.jpeg_only
    fit = _channels_fitter(preprocess.channels)
    return (_crops(lambda image: preprocessing.eval_crop(fit(image), preprocess, jpeg=jpeg),
                   False), None)


def small_image_training_steps(p):
    """(per record, per batch) for training on same-size in-memory images (MNIST, CIFAR):
    padded and cropped as whole batches."""
    preprocess = p.preprocess
    fit = Step(_channels_fitter(preprocess.channels))
    return fit, _crops(lambda images, s: preprocessing.pad_crop_batch(images, s, preprocess),
                       True)


def photo_training_steps(p):
    """(per record, per batch) for training on photos: each image's random crop (fused with
    JPEG decoding)."""
    preprocess, jpeg = p.preprocess, p.info.jpeg_only
    fit = _channels_fitter(preprocess.channels)
    return (_crops(lambda image, s: preprocessing.random_crop(fit(image), s, preprocess,
                                                              jpeg=jpeg), True), None)


def prepared_evaluation_steps(p):
    """(per record, per batch) for evaluating prepared data (prepare.py) on centre crops: the
    centre window decoded alone from the stored JPEG, never resampled.
    (Training: _prepared_training; ten crops: ten_crop_steps.)"""
    preprocess = p.preprocess
    return Step(lambda x: image_bytes.prepared_center_crop(x, preprocess)), None
