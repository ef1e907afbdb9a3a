"""Encoded image bytes, read without decoding them where that suffices: their format, the pixels
their header declares, whether they are a whole file; their decoding; and the windows of
prepared JPEGs (prepare.py), each decoded alone."""

import tensorflow as tf


def is_encoded(image):
    """True for a scalar string tensor (encoded JPEG/PNG), False for a decoded image."""
    return tf.convert_to_tensor(image).dtype == tf.string


def decode(encoded, channels):
    """Decodes JPEG/PNG bytes to float32 [H, W, channels] in [0, 255]."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    return tf.cast(image, tf.float32)


# The smallest JPEG header tf.io.extract_jpeg_shape reads (SOI, a 1x1 SOF0, SOS, EOI). It stands
# in for bytes that are not JPEG, so that reading the header takes no tf.cond (header_pixels).
ONE_PIXEL_JPEG = (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x01\x00\x01\x01\x01\x11\x00"
                   b"\xff\xda\x00\x08\x01\x01\x00\x00?\x00\xff\xd9")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header_pixels(encoded):
    """Height x width (int64) that JPEG or PNG bytes declare, read from the header without
    decoding: JPEG's SOF marker (tf.io.extract_jpeg_shape), PNG's IHDR chunk. -1 for bytes in
    neither format. A JPEG whose header cannot be parsed raises InvalidArgumentError."""
    encoded = tf.convert_to_tensor(encoded)
    jpeg = tf.io.is_jpeg(encoded)
    jpeg_shape = tf.io.extract_jpeg_shape(tf.where(jpeg, encoded, ONE_PIXEL_JPEG), tf.int64)
    # PNG: the signature, then IHDR (length, type, width, height): big-endian uint32s at 16-23.
    header = tf.strings.substr(tf.strings.join([encoded, b"\0" * 24]), 0, 24)
    ihdr = tf.cast(tf.io.decode_raw(header, tf.uint8)[16:24], tf.int64)
    big_endian = tf.constant([2**24, 2**16, 2**8, 1], tf.int64)
    png_pixels = tf.reduce_sum(ihdr[:4] * big_endian) * tf.reduce_sum(ihdr[4:] * big_endian)
    png = tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE)
    return tf.where(jpeg, jpeg_shape[0] * jpeg_shape[1],
                    tf.where(png, png_pixels, tf.constant(-1, tf.int64)))


def checked(encoded, max_pixels):
    """`encoded` once its header shows a JPEG or PNG of at most max_pixels pixels, else an
    InvalidArgumentError (before anything is decoded) saying which limit it broke."""
    pixels = header_pixels(encoded)
    known = tf.debugging.Assert(pixels >= 0, ["not a JPEG or PNG image"])
    with tf.control_dependencies([known]):
        small = tf.debugging.Assert(pixels <= max_pixels, [tf.strings.format(
            "image of {} pixels is over the limit of {} pixels (export.py --max_pixels)",
            [pixels, max_pixels])])
    with tf.control_dependencies([small]):
        return tf.identity(encoded)


def looks_complete(encoded):
    """Cheap in-graph check that bytes are a whole JPEG or PNG file (magic and end marker); of
    one string or, element by element, of a vector of them.

    Zero-byte, non-image and truncated files fail it, so they can be skipped and counted
    instead of stopping an epoch with a decode error.
    """
    size = tf.strings.length(encoded)
    tail2 = tf.strings.substr(encoded, tf.maximum(size - 2, 0), tf.fill(tf.shape(size), 2))
    tail8 = tf.strings.substr(encoded, tf.maximum(size - 8, 0), tf.fill(tf.shape(size), 8))
    jpeg = tf.logical_and(tf.io.is_jpeg(encoded), tf.equal(tail2, b"\xff\xd9"))
    png = tf.logical_and(
        tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE),
        tf.equal(tail8, b"IEND\xaeB`\x82"),
    )
    return tf.logical_and(size > 0, tf.logical_or(jpeg, png))


# --------------------------------------------------------------------------------------------
# Prepared data (prepare.py): JPEGs already at the paper's 256 x 256, windows decoded alone


def prepared_random_crops(encoded, seed, preprocess, stored_size=None):
    """Paper §4.1's training crops of a batch of prepared JPEGs [N] (N known when tracing): for
    each, a random image_size x image_size window anywhere in the stored image, decoded alone
    (`decode_and_crop_jpeg`), not resampled. Returns uint8 [N, image_size, image_size, channels].

    A whole batch per call, one decode op per image in one graph (TensorFlow runs them side by
    side): in tf.data, a map call per image costs about as much as decoding its window, and a
    tf.map_fn loop still a measurable share (BENCHMARKS.md, "Input pipelines"). `stored_size`:
    every image is stored_size x stored_size (prepare.py without keep_frame), so no header is
    read.
    """
    count, size = encoded.shape[0], preprocess.image_size
    if count is None:
        raise ValueError("prepared_random_crops needs a batch size known when tracing")
    if stored_size is None:
        shapes = tf.stack([tf.io.extract_jpeg_shape(encoded[i])[:2] for i in range(count)])
    else:
        shapes = tf.fill([count, 2], stored_size)
    draws = tf.random.stateless_uniform([count, 2], seed, 0, tf.int32.max, dtype=tf.int32)
    offsets = draws % (shapes - size + 1)  # a bias of < 1e-7 for any image size
    return tf.stack([
        tf.image.decode_and_crop_jpeg(
            encoded[i], tf.stack([offsets[i, 0], offsets[i, 1], size, size]),
            channels=preprocess.channels)
        for i in range(count)])


def prepared_center_crop(encoded, preprocess):
    """The central image_size x image_size window of a prepared JPEG, decoded alone; uint8."""
    shape = tf.io.extract_jpeg_shape(encoded)
    size = preprocess.image_size
    window = tf.stack([(shape[0] - size) // 2, (shape[1] - size) // 2, size, size])
    crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=preprocess.channels)
    return tf.ensure_shape(crop, [size, size, preprocess.channels])
