"""The one check of users' image files: which records can be decoded, and why the others are
skipped. Every path that decodes user files reads it: the input pipeline, the PCA sample, the
check of a split before training, and prepare.py.
"""

import collections

import tensorflow as tf

from alexnet_tf import image_bytes

# Why a record is skipped. INCOMPLETE, OVERSIZED and NOT_JPEG are read from the bytes without
# decoding them (`status`); UNDECODABLE is a decoding that raised (`decoded_or_skipped`);
# NOT_A_FILE is a folder entry named as an image that is no readable file (a broken link, a
# directory), left out of the listing.
OK, INCOMPLETE, OVERSIZED, NOT_JPEG, UNDECODABLE, NOT_A_FILE = range(6)
REASONS = {
    INCOMPLETE: "not a whole JPEG or PNG file",
    OVERSIZED: "its header declares more pixels than max_pixels",
    NOT_JPEG: "not a JPEG, though the folder's files are named as JPEGs",
    UNDECODABLE: "could not be decoded",
    NOT_A_FILE: "not a readable file",
}


def status(encoded, max_pixels, jpeg_only=False):
    """The int32 status (OK or a reason above) of one image's encoded bytes, read from its magic
    numbers, end marker and header only: whole JPEG or PNG files within the pixel budget pass.
    `jpeg_only`: PNG bytes are refused too, for pipelines that decode JPEG with no format branch
    (a tf.cond per image is one more sequential step per image in tf.data)."""
    complete = image_bytes.looks_complete(encoded)
    # The header of bytes cut short may itself be cut, and unparsable: it is not read.
    header = tf.where(complete, encoded, image_bytes.ONE_PIXEL_JPEG)
    oversized = image_bytes.header_pixels(header) > max_pixels
    code = tf.where(oversized, OVERSIZED, OK)
    if jpeg_only:
        code = tf.where(tf.io.is_jpeg(encoded), code, NOT_JPEG)
    return tf.where(complete, code, INCOMPLETE)


def decoded_or_skipped(ds, image_of, decode, stand_in, max_pixels, jpeg_only=False,
                       parallel=1):
    """Every element x of `ds` as (OK, *decode(*x)) or, when its image `image_of(*x)` fails
    `status`, as (reason, *stand_in(*x)); where reading the header or decoding raises (damage
    that `status` cannot see), as (UNDECODABLE, *stand_in(*x)). Every element arrives, in order,
    to be counted. One small dataset per element, `parallel` at a time: for passes over a
    user's files before or beside training (the split check, the PCA sample, prepare.py), not
    for the training pipeline's hot path, which filters on `status` and leaves what still fails
    to tf.data's ignore_errors and its warning."""

    # No Python control flow to convert; autograph would only warn about the callers' lambdas.
    @tf.autograph.experimental.do_not_convert
    def attempt(*element):
        code = status(image_of(*element), max_pixels, jpeg_only)
        return tf.cond(tf.equal(code, OK), lambda: (code, *decode(*element)),
                       lambda: (code, *stand_in(*element)))

    @tf.autograph.experimental.do_not_convert
    def one(*element):
        failed = tf.data.Dataset.from_tensors((UNDECODABLE, *stand_in(*element)))
        done = tf.data.Dataset.from_tensors(element).map(attempt)
        return done.ignore_errors().concatenate(failed).take(1)

    return ds.interleave(one, cycle_length=parallel, num_parallel_calls=parallel,
                         deterministic=True)


class Skips(collections.Counter):
    """Skipped records counted by reason."""

    def describe(self):
        """"2 not a whole JPEG or PNG file, 1 not a readable file", or "none"."""
        return ", ".join(f"{n} {REASONS[r]}" for r, n in sorted(self.items()) if n) or "none"
