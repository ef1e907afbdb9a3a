"""Train AlexNet from the command line: python train.py --flagfile=configs/<recipe>.cfg

This file holds the flags and main() only: the settings are alexnet_tf.train_config's, the work
is alexnet_tf.training's.
"""

import dataclasses
import os
import sys
import typing
from types import NoneType

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up noise out
# oneDNN's CPU kernels train these models faster on AVX2 CPUs too, where TensorFlow leaves them
# off by default (BENCHMARKS.md). Read once, when TensorFlow starts; a user's own setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags, logging  # noqa: E402

from alexnet_tf import backup, cli, keras_compat, sources, train_config, training  # noqa: E402


def _define_flags():
    """One flag per TrainConfig field, with its default, help and choices (DEFINE_enum refuses
    other values, listing them)."""
    for field in dataclasses.fields(train_config.TrainConfig):
        default, help_text = field.default, field.metadata["help"]
        kind = next(t for t in typing.get_args(field.type) or (field.type,) if t is not NoneType)
        if field.metadata["choices"]:
            flags.DEFINE_enum(field.name, default, field.metadata["choices"], help_text)
        else:
            define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                      float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
            define(field.name, default, help_text)
    flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs and results go; "
                        "running the same command again resumes from it.")


_define_flags()
FLAGS = flags.FLAGS


def config_from_flags():
    return train_config.TrainConfig(
        **{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(train_config.TrainConfig)})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    try:
        training.train_and_evaluate(config_from_flags(), FLAGS.workdir)
    except backup.Interrupted as e:
        # Saved: the status says which signal ended the run, as the signal itself would.
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (train_config.TrainingError, sources.DataError, keras_compat.KerasCompatibilityError,
            OSError, *cli.file_errors()) as e:
        cli.exit_with_error("train.py", e)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("train.py"))
