"""The files that sources read, and what they say: IDX arrays, class-folder listings, prepare.py's
descriptions and the tf.train.Example records of TFRecord shards."""

import gzip
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_VAL_FRACTION = 0.1
# prepare.py's description of a prepared directory (classes, records, PCA), beside its shards.
PREPARED_DESCRIPTION = "dataset.json"
PREPARED_FORMAT = "alexnet_tf prepared v1"


class DataError(ValueError):
    """A user-facing data problem (missing path, empty folder, bad label); one-line message."""


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


def list_class_folders(root):
    """(class names, files, labels, entries named as images that are no regular file) of a tree
    of one folder per class. Names are kept as the filesystem gives them: one that is not UTF-8
    is a str with surrogate escapes (os.fsencode gives its bytes back)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class sub-directories (expected one folder per class)")
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
    return classes, files, labels, tuple(not_files)


def in_validation_split(path):
    # Stable across runs and machines: a hash of the file name's bytes (as the filesystem holds
    # them, UTF-8 or not), not of the listing order.
    digest = hashlib.md5(os.fsencode(os.path.basename(path))).digest()
    return digest[0] < 256 * FOLDER_VAL_FRACTION


def held_out_way_out(root):
    """What to do when the validation images that a folder without train/ and val/ sub-folders
    holds out are too few: one clause for a one-line message."""
    return (f"this folder holds out about {FOLDER_VAL_FRACTION:.0%} of its files, chosen by "
            f"name, for validation: add images, or choose the validation images with "
            f"{printable(root)}/train/<class>/ and {printable(root)}/val/<class>/ sub-folders")


def printable(path):
    """A file name fit for a message: bytes that are not UTF-8 shown as \\x escapes."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
