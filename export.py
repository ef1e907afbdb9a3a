"""Export a trained run as a versioned SavedModel for TF Serving.

    python export.py --workdir=runs/fashion_mnist --export_dir=exports/alexnet

writes exports/alexnet/<N>/ (the next version) with the signatures `serving_default`
(encoded JPEG/PNG bytes) and `predict_images` (float images in [0, 255]). The work is in
alexnet_tf.serving.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Training run directory (train.py's --workdir).", required=True)
flags.DEFINE_string("export_dir", None, "Model base path: <base>/<model_name>.", required=True)
flags.DEFINE_integer("version", None, "Version number; default: the next integer.")
flags.DEFINE_bool("ten_crop", False, "Average the paper's 10 crops inside the graph.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint of the run.")
flags.DEFINE_integer("top_k", 5, "Classes and scores returned per image.")
flags.DEFINE_integer(
    "max_pixels", None, "serving_default refuses images whose header declares more pixels, "
    "before decoding them; default: the run's (train.py --max_pixels, 40,000,000).",
    lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    from alexnet_tf import cli, serving

    try:
        model, class_names, config = serving.load_run(FLAGS.workdir, FLAGS.checkpoint)
        if FLAGS.max_pixels is not None:
            config = dataclasses.replace(config, max_pixels=FLAGS.max_pixels)
        path = serving.export_saved_model(
            model, FLAGS.export_dir, class_names, config, version=FLAGS.version,
            ten_crop=FLAGS.ten_crop, overwrite=FLAGS.overwrite, top_k=FLAGS.top_k)
    except (serving.ExportError, OSError, *cli.TF_FILE_ERRORS) as e:
        cli.exit_with_error("export.py", e)
    print(f"exported {path}\n  inspect: saved_model_cli show --all --dir {path}")


if __name__ == "__main__":
    from alexnet_tf import cli

    app.run(main, flags_parser=cli.flags_parser("export.py"))
