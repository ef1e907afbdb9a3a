"""Passes over a split's records through the guard, before or beside training: the check that a
split holds enough readable images (`check_split`) and the sample of decoded training images
that --pca=dataset reads (`decoded_sample`). Every record arrives and is counted, in order."""

import os

import tensorflow as tf

from alexnet_tf import guard, image_bytes, sources
from alexnet_tf.sources import DataError


def _through_guard(source, split, max_pixels, decode, stand_in):
    """A split's records, in their reading order, as (status, value) through the guard: value
    is `decode(encoded bytes)` of an image that passes it, else `stand_in`; decoded arrays (IDX)
    pass as they are. Returns (that iterator, guard.Skips of the entries the listing left
    out, the split's DatasetInfo). What the split check and the PCA sample both read."""
    info = source.info(split)
    ds = source.records(split, deterministic=True)
    skips = guard.Skips({guard.NOT_A_FILE: len(info.not_files)})
    if not info.encoded:  # decoded arrays: every record is an image
        records = ds.map(lambda image, label, origin: (guard.OK, image))
    else:
        # The pipeline's own rule (info.jpeg_only) decides, so that both see what training sees.
        records = guard.decoded_or_skipped(
            ds, image_of=lambda image, label, origin: image,
            decode=lambda image, label, origin: (decode(image),),
            stand_in=lambda *_: (stand_in,), max_pixels=max_pixels, jpeg_only=info.jpeg_only,
            parallel=os.cpu_count())
    return records.as_numpy_iterator(), skips, info


def check_split(source, split, needed, what, max_pixels, smaller=None):
    """DataError unless `split` of `source` (a Source or a source string) holds at least
    `needed` images that pass the guard and decode, read in order until that many are found: a
    run that would stop for want of images stops before it starts, saying why and what to do.
    `what` names what needs them ("one training batch (--batch_size=4)"); `smaller`, when
    given, names the setting that would need fewer ("a smaller --batch_size")."""
    # Decoded, not only checked: a split of files damaged inside would pass every check of the
    # bytes, and a repeating pipeline would then wait for ever for its first image.
    records, skips, info = _through_guard(
        sources.as_source(source), split, max_pixels,
        lambda image: tf.size(image_bytes.decode(image, 3)), 0)
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
        f"{sources.printable(info.source)}: the {split} split has {readable} readable image(s) "
        f"of {found + len(info.not_files)} file(s), fewer than the {needed} that {what} needs; "
        f"skipped: {skips.describe()}; {_way_out(info, split, smaller)}")


def _way_out(info, split, smaller):
    """What a user can do about a split with too few readable images: one clause."""
    if split == "validation" and info.held_out:
        more = sources.held_out_way_out(sources.parse_source(info.source)[1])
    else:
        more = f"add readable images to the {split} split"
    return f"{more}, or use {smaller}" if smaller else more


def decoded_sample(source, count, max_pixels):
    """Up to `count` training images of `source` (a Source or a source string) through the
    guard, decoded to RGB float32 in [0, 255], in their reading order: (images, guard.Skips of
    those left out)."""
    records, skips, _ = _through_guard(
        sources.as_source(source), "train", max_pixels,
        lambda image: image_bytes.decode(image, 3), tf.zeros([0, 0, 3]))
    images = []
    for code, image in records:
        if code != guard.OK:
            skips[int(code)] += 1
            continue
        images.append(image)
        if len(images) == count:
            break
    return images, skips
