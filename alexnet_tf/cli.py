"""What every command line of the project shares (train.py, export.py, prepare.py, python -m
alexnet_tf.visualize, python -m alexnet_tf.data_service): absl flags, and user mistakes and
machine conditions as one line and exit status 2.

It imports no TensorFlow, so that data_service's supervisor, which runs without it, shares it.
"""

import sys

from absl import flags


def file_errors():
    """TensorFlow's errors of the files a user's settings or machine name (a workdir that
    cannot be created, a full disk, a path without permission): its own file code (SavedModel
    writing, tf.io.gfile) raises these where Python raises OSError."""
    import tensorflow as tf

    return (tf.errors.NotFoundError, tf.errors.PermissionDeniedError,
            tf.errors.ResourceExhaustedError, tf.errors.AlreadyExistsError)


def describe(error):
    """One line for an OSError ("No space left on device: /path"), a TensorFlow file error (its
    message) or anything else (its text), whitespace and line breaks collapsed."""
    tf = sys.modules.get("tensorflow")  # a TensorFlow error needs TensorFlow imported
    if isinstance(error, OSError) and error.errno and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    elif tf is not None and isinstance(error, tf.errors.OpError):
        text = error.message
    else:
        text = str(error)
    return " ".join(text.split())


def exit_with_error(program, error):
    """Prints `<program>: error: <one line>` on stderr and exits with status 2."""
    print(f"{program}: error: {describe(error)}", file=sys.stderr, flush=True)
    # What is left of a half-written file is freed while the process exits, and h5py's finaliser
    # then fails again on the same full disk, printing tracebacks (through both hooks) after the
    # line above: the error is already reported.
    sys.unraisablehook = lambda unraisable: None
    sys.excepthook = lambda *exc_info: None
    sys.exit(2)


def flags_parser(program):
    """absl's flag parser for app.run(flags_parser=...) with its errors (an unknown flag, a bad
    value, a missing --flagfile) as one line and exit status 2, like every other user mistake."""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            exit_with_error(program, str(e).removeprefix("ERROR:: "))

    return parse
