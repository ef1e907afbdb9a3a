"""Export for the runtimes beside TF Serving: LiteRT (float, or quantized to int8), ONNX and
OpenVINO IR, written through Keras' own exporters where they do the job.

Every format holds the model and its softmax, computed in float32, and nothing else:

- input `images`: float32 [N, S, S, C], evaluation views as `preprocessing.eval_image` cuts and
  normalises them (the README's "Deploy" section gives the same in numpy);
- output `probabilities`: float32 [N, classes].

A version directory holds the model file (`MODEL_FILES`), `labels.txt` (class names, one a line,
line i naming class id i) and `preprocessing.json` (the run's PreprocessConfig: the view's size,
mean and std).
"""

import importlib.util
import os

import keras
import tensorflow as tf

from alexnet_tf import data, serving
from alexnet_tf.flag_facts import CALIBRATION_IMAGES, MODEL_FILES, quantize_mistake
from alexnet_tf.layers import standard_ops
from alexnet_tf.rundir import RunDir, RunDirError

# The modules each conversion imports (LiteRT's converter is TensorFlow's own); the export extra
# installs them.
CONVERTERS = {"litert": (), "onnx": ("tf2onnx", "onnx"), "openvino": ("openvino",)}


def check_converters(fmt):
    """ExportError, before anything is loaded, when the converter of `fmt` is not installed."""
    missing = [name for name in CONVERTERS.get(fmt, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise serving.ExportError(f"--format={fmt} needs {', '.join(missing)}: "
                                  "pip install 'alexnet_tf[export]'")


def float32_model(model):
    """`model` when every layer computes in float32, else a float32 copy with its weights: a
    mixed-precision run's bfloat16 or float16 arithmetic has no kernels in LiteRT and breaks the
    ONNX converter, and its variables are float32 anyway."""
    if all(layer.compute_dtype == "float32" for layer in model.layers):
        return model
    model_config = model.get_config()
    for layer in model_config["layers"]:
        if "dtype" in layer["config"]:
            layer["config"]["dtype"] = "float32"
    copy = model.__class__.from_config(model_config)
    copy.set_weights(model.get_weights())
    return copy


def probability_model(model):
    """AlexNet `model` (logits) and a softmax, in float32: input `images`, output
    `probabilities`."""
    model = float32_model(model)
    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(model.output)
    return keras.Model(model.input, {"probabilities": probabilities}, name=model.name)


def litert_options(quantize, calibration=None, int8_io=False):
    """TFLiteConverter settings (keyword arguments of Keras' LiteRT exporter) of a quantization.

    "dynamic": int8 weights, float activations. "int8": full-integer post-training
    quantization, its activation ranges measured on `calibration` (float32 model inputs
    [K, S, S, C]); an op that LiteRT has no int8 kernel for (LOCAL_RESPONSE_NORMALIZATION)
    computes in float between a dequantize and a quantize. The model's input and output stay
    float32 unless `int8_io`.
    """
    if quantize == "none":
        return {}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "int8":
        if calibration is None or not len(calibration):
            raise serving.ExportError("--quantize=int8 needs calibration images")

        def representative_dataset():
            for image in calibration:
                yield {"images": image[None]}

        options.update(representative_dataset=representative_dataset,
                       target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]})
        if int8_io:
            options.update(inference_input_type=tf.int8, inference_output_type=tf.int8)
    return options


def write_model(model, path, fmt, quantize="none", calibration=None, int8_io=False):
    """Writes AlexNet `model` with its softmax (`probability_model`) as `path` in format `fmt`."""
    wrapped = probability_model(model)
    signature = [tf.TensorSpec([None, *wrapped.input_shape[1:]], tf.float32, name="images")]
    # Traced with TensorFlow's standard LRN and MatMul ops, which every converter knows, not the
    # CPU fast paths the layers take in this process (as for SavedModels: layers.standard_ops).
    with standard_ops():
        if fmt == "openvino":
            # By hand: Keras' OpenVINO exporter imports Keras' OpenVINO backend, which needs SciPy.
            # float32 weights (save_model's default would store them as float16).
            import openvino

            function = tf.function(lambda images: wrapped(images, training=False))
            converted = openvino.convert_model(function.get_concrete_function(*signature))
            openvino.save_model(converted, path, compress_to_fp16=False)
        else:
            options = litert_options(quantize, calibration, int8_io) if fmt == "litert" else {}
            wrapped.export(path, format=fmt, input_signature=signature, verbose=False, **options)


def calibration_images(workdir, preprocess, count=CALIBRATION_IMAGES):
    """Up to `count` of a run's training images as the model sees them in evaluation (the centre
    view of `preprocessing.eval_image`): float32 [K, S, S, C]. A class-folder tree is read in a
    fixed pseudo-random order, so that the sample holds every class."""
    try:
        dataset, _ = RunDir(workdir).dataset("train", False, count, data.Options(order_seed=0),
                                             "int8 calibration", preprocess=preprocess)
    except RunDirError as e:
        raise serving.ExportError(str(e)) from None
    images, _ = next(iter(data.on_host(dataset, preprocess, training=False)))
    return images.numpy()


def export(model, export_dir, class_names, preprocess, fmt, quantize="none", calibration=None,
           int8_io=False, version=None, overwrite=False):
    """Writes `<export_dir>/<version>/` (the next version by default) with the model file of
    `fmt`, labels.txt and preprocessing.json, atomically (`serving.write_version`); returns its
    path."""
    if fmt not in MODEL_FILES:
        raise serving.ExportError(f"unknown format {fmt!r}; choose one of {sorted(MODEL_FILES)}")
    mistake = quantize_mistake(fmt, quantize)
    if mistake:
        raise serving.ExportError(mistake)
    if len(class_names) != model.output_shape[-1]:
        raise serving.ExportError(
            f"{len(class_names)} class names for a model with {model.output_shape[-1]} outputs")
    check_converters(fmt)

    def write(directory):
        write_model(model, os.path.join(directory, MODEL_FILES[fmt]), fmt, quantize, calibration,
                    int8_io)
        serving.write_class_names(os.path.join(directory, "labels.txt"), class_names)
        preprocess.to_json(os.path.join(directory, "preprocessing.json"))

    return serving.write_version(export_dir, write, version, overwrite)

