"""Export a trained run: a versioned SavedModel for TF Serving, or a LiteRT, ONNX or OpenVINO file.

    python export.py --workdir=runs/fashion_mnist --export_dir=exports/alexnet
    python export.py --workdir=runs/fashion_mnist --export_dir=exports/alexnet_litert \
        --format=litert --quantize=int8

writes <export_dir>/<N>/ (the next version). A SavedModel has the signatures `serving_default`
(encoded JPEG/PNG bytes) and `predict_images` (float images in [0, 255]); the other formats take
evaluation views (README, "Deploy"). The work is in alexnet_tf.serving and alexnet_tf.formats.
"""

import dataclasses
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402


def _leaf(name):
    """alexnet_tf.<name>, a module that imports nothing of TensorFlow or the package, loaded
    without the package's __init__ (which imports the model, and with it TensorFlow): the flags
    parse, and --help answers, before TensorFlow starts. It is registered under its own name, so
    the package, once imported, uses this same module."""
    qualified = f"alexnet_tf.{name}"
    if qualified not in sys.modules:
        (package_dir,) = importlib.util.find_spec("alexnet_tf").submodule_search_locations
        spec = importlib.util.spec_from_file_location(qualified,
                                                      os.path.join(package_dir, f"{name}.py"))
        sys.modules[qualified] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[qualified])
    return sys.modules[qualified]


cli, flag_facts = _leaf("cli"), _leaf("flag_facts")

flags.DEFINE_string("workdir", None, "Training run directory (train.py's --workdir).", required=True)
flags.DEFINE_string("export_dir", None, "Model base path: <base>/<model_name>.", required=True)
flags.DEFINE_enum("format", "saved_model", flag_facts.FORMATS,
                  "saved_model: for TF Serving (encoded images in). litert (.tflite), onnx, "
                  "openvino (IR .xml/.bin): the model and its softmax, evaluation views in.")
flags.DEFINE_enum("quantize", "none", flag_facts.QUANTIZATIONS,
                  "--format=litert only. dynamic: int8 weights, float activations. int8: "
                  "full-integer, calibrated on --calibration_images of the run's training images.")
flags.DEFINE_integer("calibration_images", flag_facts.CALIBRATION_IMAGES,
                     "--quantize=int8: training images (evaluation views) that calibrate it.",
                     lower_bound=1)
flags.DEFINE_bool("int8_io", False, "--quantize=int8: int8 input and output instead of float32.")
flags.DEFINE_integer("version", None, "Version number; default: the next integer.")
flags.DEFINE_bool("ten_crop", False,
                  "--format=saved_model: average the paper's 10 crops inside the graph.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint of the run.")
flags.DEFINE_integer("top_k", 5, "--format=saved_model: classes and scores returned per image.")
flags.DEFINE_integer(
    "max_pixels", None, "--format=saved_model: serving_default refuses images whose header "
    "declares more pixels, before decoding them; default: the run's (train.py --max_pixels, "
    f"{flag_facts.MAX_PIXELS:,}).", lower_bound=1)
FLAGS = flags.FLAGS

# Flags that mean something for some formats only: given with another, they are a mistake.
_SAVED_MODEL_ONLY = ("ten_crop", "top_k", "max_pixels")
_INT8_ONLY = ("calibration_images", "int8_io")


def _format_flags_mistake():
    """What is wrong with the flags of one format given with another, or None."""
    fmt, quantize = FLAGS.format, FLAGS.quantize
    for name in _SAVED_MODEL_ONLY + _INT8_ONLY:
        if not FLAGS[name].present:
            continue
        if name in _SAVED_MODEL_ONLY and fmt != "saved_model":
            return f"--{name} is for --format=saved_model, not {fmt}"
        if name in _INT8_ONLY and quantize != "int8":
            return f"--{name} is for --quantize=int8, not {quantize}"
    return flag_facts.quantize_mistake(fmt, quantize)


def _export_other_format(model, class_names, config):
    from alexnet_tf import formats

    calibration = None
    if FLAGS.quantize == "int8":
        calibration = formats.calibration_images(FLAGS.workdir, config, FLAGS.calibration_images)
        logging.info("int8 calibration: %d training images", len(calibration))
    return formats.export(
        model, FLAGS.export_dir, class_names, config, FLAGS.format, quantize=FLAGS.quantize,
        calibration=calibration, int8_io=FLAGS.int8_io, version=FLAGS.version,
        overwrite=FLAGS.overwrite)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    from alexnet_tf import formats, serving, sources

    mistake = _format_flags_mistake()
    if mistake:
        cli.exit_with_error("export.py", mistake)
    try:
        formats.check_converters(FLAGS.format)
        model, class_names, config = serving.load_run(FLAGS.workdir, FLAGS.checkpoint)
        if FLAGS.format != "saved_model":
            path = _export_other_format(model, class_names, config)
            print(f"exported {path}")
            return
        if FLAGS.max_pixels is not None:
            config = dataclasses.replace(config, max_pixels=FLAGS.max_pixels)
        path = serving.export_saved_model(
            model, FLAGS.export_dir, class_names, config, version=FLAGS.version,
            ten_crop=FLAGS.ten_crop, overwrite=FLAGS.overwrite, top_k=FLAGS.top_k)
    except (serving.ExportError, sources.DataError, OSError, *cli.file_errors()) as e:
        cli.exit_with_error("export.py", e)
    print(f"exported {path}\n  inspect: saved_model_cli show --all --dir {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("export.py"))
