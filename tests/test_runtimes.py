"""The export's `predict_images` in the runtimes users pick instead of TensorFlow: OpenVINO and
ONNX Runtime (through tf2onnx), each against TensorFlow's answer on real photographs, for both
shipped ImageNet variants."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import alexnet_tf
from alexnet_tf import preprocessing, serving
from tests.helpers import photo_framings, recentre_classifier, require

# The bench extra (pip install -e '.[bench]'), which the test extra installs.
openvino = require("openvino")
onnxruntime = require("onnxruntime")
require("tf2onnx")

pytestmark = pytest.mark.slow


# The shipped ImageNet variants: their crop, and the sharpness that makes their answers peaked
# but not saturated (`recentre_classifier`).
VARIANTS = {"paper": (preprocessing.PreprocessConfig(image_size=227, resize_size=256), 200),
            "one_weird_trick": (preprocessing.PreprocessConfig(image_size=224, resize_size=256),
                                100)}
# How far the other runtimes' float32 probabilities may be from TensorFlow's (the differences
# measured: BENCHMARKS.md, "Float32 formats beside the SavedModel" and "Serving beside other
# runtimes").
ATOL = 1e-4


@pytest.fixture(scope="module")
def photographs():
    return photo_framings()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def export(request, tmp_path_factory, photographs):
    """A seeded export of the variant whose classifier is re-centred and sharpened on these
    photographs."""
    config, sharpness = VARIANTS[request.param]
    keras.utils.set_random_seed(3)
    model = alexnet_tf.AlexNet(variant=request.param)
    recentre_classifier(model, preprocessing.eval_images(photographs, config).numpy(),
                        sharpness=sharpness)
    return serving.export_saved_model(model, str(tmp_path_factory.mktemp("export") / "alexnet"),
                                      [f"class{i}" for i in range(1000)], config, version=1)


@pytest.fixture(scope="module")
def tensorflow_probabilities(export, photographs):
    signature = tf.saved_model.load(export).signatures["predict_images"]
    probabilities = signature(images=tf.constant(photographs))["probabilities"].numpy()
    top2 = np.sort(probabilities, axis=-1)[:, -2:]
    # The comparison means something: peaked answers whose top-1 the tolerance cannot flip.
    assert (top2[:, 1] > 0.05).all() and (top2[:, 1] < 0.999).all(), top2  # not saturated
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all(), top2
    assert len(set(probabilities.argmax(-1))) > 2  # not one class for every photograph
    return probabilities


def assert_agrees(probabilities, expected):
    np.testing.assert_allclose(probabilities, expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))


def test_openvino_runs_predict_images_as_tensorflow_does(export, photographs,
                                                         tensorflow_probabilities):
    loaded = tf.saved_model.load(export)  # alive while OpenVINO converts its signature
    converted = openvino.convert_model(loaded.signatures["predict_images"])
    # float32 arithmetic (a CPU with bfloat16 units would otherwise compute in bf16).
    compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    (output,) = [out for out in compiled.outputs if "probabilities" in out.names]
    assert_agrees(compiled(photographs)[output], tensorflow_probabilities)


def test_onnxruntime_runs_tf2onnx_predict_images_as_tensorflow_does(
        export, photographs, tensorflow_probabilities, tmp_path):
    onnx_path = str(tmp_path / "alexnet.onnx")
    # The command the README gives.
    subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", export,
                    "--signature_def", "predict_images", "--output", onnx_path],
                   check=True, capture_output=True)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    outputs = [o.name for o in session.get_outputs()]
    assert "probabilities" in outputs and "classes" in outputs
    probabilities, classes = session.run(["probabilities", "classes"], {"images": photographs})
    assert_agrees(probabilities, tensorflow_probabilities)
    expected = [f"class{i}" for i in tensorflow_probabilities.argmax(-1)]
    assert [str(c) for c in classes[:, 0]] == expected
