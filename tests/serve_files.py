"""Runs an exported SavedModel's `serving_default` on image files, in a process of its own so
that the tests can measure its peak memory:

    python tests/serve_files.py EXPORT_DIR IMAGE_FILE...

Prints the outputs as JSON. A request TensorFlow refuses (InvalidArgumentError) exits with 3 and
its message on stderr, as tests/native/load_saved_model.cc does.
"""

import json
import sys

import tensorflow as tf


def main(export_dir, paths):
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    images = []
    for path in paths:
        with open(path, "rb") as f:
            images.append(f.read())
    try:
        outputs = serve(image_bytes=tf.constant(images))
    except tf.errors.InvalidArgumentError as e:
        print(f"TensorFlow error {e.error_code}: {e.message}", file=sys.stderr)
        return 3
    print(json.dumps({name: value.numpy().tolist() for name, value in outputs.items()
                      if value.dtype != tf.string}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
