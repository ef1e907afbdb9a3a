"""export.py --format=litert|onnx|openvino: each file in its own runtime against the SavedModel,
on Fashion-MNIST's real test images (the README recipe's model) and on photographs (the paper and
one_weird_trick models); the README's numpy evaluation view against eval_image; bad flags."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import alexnet_tf
from alexnet_tf import flag_facts, formats, preprocessing, serving, sources
from tests.helpers import (ROOT, assert_one_line_error, decisive_photo_export, photo_framings,
                           require, require_fashion_mnist, run_train)

# The export extra (pip install -e '.[export]'), which the test extra installs.
EXPORT_EXTRA = ("ai_edge_litert", "onnxruntime", "openvino", "tf2onnx", "onnx")
needs_export_extra = pytest.mark.usefixtures("export_extra")


@pytest.fixture
def export_extra():
    for name in EXPORT_EXTRA:
        require(name)


README = os.path.join(ROOT, "README.md")


def readme_deploy_blocks():
    """The ```python blocks of the README's "Deploy" section, in order."""
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Deploy"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def readme_evaluation_view():
    namespace = {}
    exec(readme_deploy_blocks()[0], namespace)
    return namespace["evaluation_view"]


def run_export(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *args],
                          capture_output=True, text=True, env=env, **kwargs)


class Runtime:
    """A format's file loaded in its own runtime: `probabilities(views)` for float32 views.
    LiteRT runs as it does by default (its XNNPACK delegate on a CPU), or with `reference`
    its builtin kernels alone."""

    def __init__(self, version_dir, fmt, reference=False):
        path = os.path.join(version_dir, flag_facts.MODEL_FILES[fmt])
        self.fmt = fmt
        if fmt == "litert":
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if reference
                        else OpResolverType.AUTO)
            self.runner = Interpreter(model_path=path, experimental_op_resolver_type=resolver
                                      ).get_signature_runner()
            self.input = self.runner.get_input_details()["images"]
            self.output = self.runner.get_output_details()["probabilities"]
        elif fmt == "onnx":
            import onnxruntime

            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            assert [i.name for i in self.session.get_inputs()] == ["images"]
            assert [o.name for o in self.session.get_outputs()] == ["probabilities"]
        else:
            import openvino

            # float32 arithmetic (a CPU with bfloat16 units would otherwise compute in bf16).
            self.compiled = openvino.Core().compile_model(
                path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            assert [i.names for i in self.compiled.inputs] == [{"images"}]

    def probabilities(self, views, batch=500):
        return np.concatenate([self._run(views[i:i + batch]) for i in range(0, len(views), batch)])

    def _run(self, views):
        if self.fmt == "onnx":
            return self.session.run(["probabilities"], {"images": views})[0]
        if self.fmt == "openvino":
            return self.compiled(views)["probabilities"]
        if self.input["dtype"] == np.int8:  # --int8_io, as the README says to feed it
            scale, zero_point = self.input["quantization"]
            views = np.clip(np.round(views / scale) + zero_point, -128, 127).astype(np.int8)
        out = self.runner(images=views)["probabilities"]
        if self.output["dtype"] == np.int8:
            scale, zero_point = self.output["quantization"]
            out = scale * (out.astype(np.float32) - zero_point)
        return out


def assert_float_agrees(probabilities, expected):
    """≤ 1e-4 in every probability and the same top-1 wherever the reference's margin between
    its first two classes is wider than twice that (where a 1e-4 error cannot flip it)."""
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2e-4
    assert decided.mean() > 0.99, decided.mean()
    np.testing.assert_array_equal(probabilities.argmax(-1)[decided],
                                  expected.argmax(-1)[decided])


def assert_same_answers(probabilities, expected, atol):
    np.testing.assert_allclose(probabilities, expected, atol=atol, rtol=0)
    np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))


# --------------------------------------------------------------------------------------------
# Fast: the README's numpy view, the float32 copy, flags and failures.


@pytest.mark.parametrize("config, shape", [
    (preprocessing.PreprocessConfig(image_size=227, resize_size=256), (300, 400)),
    (preprocessing.PreprocessConfig(image_size=227, resize_size=256, bgr=True,
                                    mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)), (401, 257)),
    (preprocessing.PreprocessConfig(image_size=224, resize_size=256), (224, 224)),
    (preprocessing.PreprocessConfig(image_size=32, resize_size=32), (32, 32)),
])
def test_readme_evaluation_view_is_eval_image(config, shape):
    evaluation_view = readme_evaluation_view()
    pre = json.loads(json.dumps(config.__dict__))  # what preprocessing.json holds
    for image in photo_framings(*shape)[:3]:
        image = np.round(image).astype(np.uint8)  # a decoded image
        view = evaluation_view(image, pre)
        reference = preprocessing.eval_image(image, config).numpy()
        assert view.shape == reference.shape and view.dtype == np.float32
        # float32 arithmetic in another order: 1e-4 of a grey level (in units of std).
        np.testing.assert_allclose(view, reference, atol=1e-4 / min(config.std), rtol=0)


def test_readme_evaluation_view_of_a_one_channel_image():
    config = preprocessing.PreprocessConfig(image_size=28, resize_size=28, channels=1,
                                            mean=(72.94,), std=(90.02,))
    image = np.random.RandomState(0).randint(0, 256, [28, 28, 1]).astype(np.uint8)
    view = readme_evaluation_view()(image, json.loads(json.dumps(config.__dict__)))
    np.testing.assert_allclose(view, (image - 72.94) / 90.02, atol=1e-5, rtol=0)


def test_float32_model_of_a_mixed_precision_model_computes_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    mixed = alexnet_tf.AlexNet(num_classes=10, variant="cifar", input_shape=(28, 28, 1))
    keras.config.set_dtype_policy("float32")
    reference = alexnet_tf.AlexNet(num_classes=10, variant="cifar", input_shape=(28, 28, 1))
    reference.set_weights(mixed.get_weights())
    copy = formats.float32_model(mixed)
    assert {layer.compute_dtype for layer in copy.layers} == {"float32"}
    assert formats.float32_model(reference) is reference
    x = np.random.RandomState(0).randn(4, 28, 28, 1).astype(np.float32)
    np.testing.assert_allclose(copy.predict(x, verbose=0), reference.predict(x, verbose=0),
                               atol=1e-5, rtol=0)
    # The mixed model itself is further away: bfloat16 keeps 8 bits of mantissa.
    assert np.abs(mixed.predict(x, verbose=0) - reference.predict(x, verbose=0)).max() > 1e-4


@pytest.mark.parametrize("args, fragment", [
    (["--format=onnx", "--quantize=int8"], "--quantize=int8 is for --format=litert, not onnx"),
    (["--format=litert", "--ten_crop"], "--ten_crop is for --format=saved_model, not litert"),
    (["--format=openvino", "--top_k=3"], "--top_k is for --format=saved_model, not openvino"),
    (["--format=litert", "--int8_io"], "--int8_io is for --quantize=int8, not none"),
    (["--format=litert", "--quantize=dynamic", "--calibration_images=10"],
     "--calibration_images is for --quantize=int8, not dynamic"),
    (["--format=tflite"], "value should be one of"),
])
def test_flags_of_another_format_are_one_line_and_write_nothing(tiny_run, tmp_path, args,
                                                                fragment):
    export_dir = tmp_path / "exports"
    result = run_export([f"--workdir={tiny_run}", f"--export_dir={export_dir}", *args])
    assert_one_line_error(result, "export.py", fragment)
    assert not export_dir.exists()


def test_missing_run_is_one_line_and_writes_nothing(tmp_path):
    export_dir = tmp_path / "exports"
    result = run_export([f"--workdir={tmp_path / 'no_run'}", f"--export_dir={export_dir}",
                         "--format=litert"])
    assert_one_line_error(result, "export.py", "best.keras not found")
    assert not export_dir.exists()


def test_int8_without_the_run_data_is_one_line(tiny_run, tmp_path):
    """The run's IDX files moved away: calibration cannot read the training images."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    settings = json.loads((run / "config.json").read_text())
    settings["dataset"] = f"fashion_mnist:{tmp_path / 'gone'}"
    (run / "config.json").write_text(json.dumps(settings))
    export_dir = tmp_path / "exports"
    result = run_export([f"--workdir={run}", f"--export_dir={export_dir}", "--format=litert",
                         "--quantize=int8"])
    assert_one_line_error(result, "export.py", "train-images-idx3-ubyte.gz not found")
    assert not export_dir.exists()


def test_a_failed_conversion_leaves_no_version(tiny_run, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(formats, "write_model", fails)
    model, class_names, config = serving.load_run(tiny_run)
    with pytest.raises(RuntimeError, match="converter crashed"):
        formats.export(model, str(tmp_path / "exports"), class_names, config, "onnx")
    assert os.listdir(tmp_path / "exports") == []  # no version, no temporary, no claim


def test_a_missing_converter_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(serving.ExportError, match=r"needs tf2onnx: pip install 'alexnet_tf\[export\]'"):
        formats.check_converters("onnx")


def test_the_package_imports_no_converter_or_runtime():
    code = ("import sys, alexnet_tf, alexnet_tf.formats, alexnet_tf.serving; "
            f"print([m for m in {EXPORT_EXTRA!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Slow: every format in its runtime on real data.

FASHION_MNIST = sources.IDX_DIRS["fashion_mnist"]
QUANTIZED = {"dynamic": [], "int8": [], "int8_io": ["--int8_io"]}


@pytest.fixture(scope="module")
def fashion_mnist_exports(tmp_path_factory):
    """The README recipe (configs/fashion_mnist.cfg) trained for 150 steps in float32, exported
    in every format and quantization by export.py, as the README names them. Returns (root,
    {name: version dir})."""
    require_fashion_mnist()
    root = tmp_path_factory.mktemp("fashion_mnist")
    workdir = str(root / "run")
    result = run_train(["--flagfile=configs/fashion_mnist.cfg", "--epochs=1",
                        "--steps_per_epoch=150", "--mixed_precision=none", "--seed=1",
                        f"--workdir={workdir}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    versions = {}
    exports = {"saved_model": [], "litert": ["--format=litert"], "onnx": ["--format=onnx"],
               "openvino": ["--format=openvino"]}
    exports.update({name: ["--format=litert", "--quantize=int8" if "int8" in name
                           else f"--quantize={name}", *extra]
                    for name, extra in QUANTIZED.items()})
    for name, args in exports.items():
        result = run_export([f"--workdir={workdir}",
                             f"--export_dir={root / 'exports' / name}", *args], cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        versions[name] = str(root / "exports" / name / "1")
    return root, versions


@pytest.fixture(scope="module")
def fashion_mnist_test():
    """The 10,000 test images [N, 28, 28, 1] uint8 and labels."""
    images, labels = (sources.read_idx(os.path.join(FASHION_MNIST, name))
                      for name in sources.IDX_FILES["test"])
    return images[..., None], labels


@pytest.fixture(scope="module")
def saved_model_answer(fashion_mnist_exports, fashion_mnist_test):
    """The SavedModel's probabilities (predict_images) and the views the other formats take."""
    _, versions = fashion_mnist_exports
    images, _ = fashion_mnist_test
    signature = tf.saved_model.load(versions["saved_model"]).signatures["predict_images"]
    config = preprocessing.PreprocessConfig.from_json(
        os.path.join(versions["litert"], "preprocessing.json"))
    probabilities = np.concatenate([
        signature(images=tf.constant(images[i:i + 1000], tf.float32))["probabilities"].numpy()
        for i in range(0, len(images), 1000)])
    views = preprocessing.eval_images(images, config).numpy()
    return probabilities, views


@pytest.mark.slow
@needs_export_extra
@pytest.mark.parametrize("fmt", ["litert", "onnx", "openvino"])
def test_float_formats_agree_with_the_saved_model_on_fashion_mnist(
        fmt, fashion_mnist_exports, fashion_mnist_test, saved_model_answer):
    _, versions = fashion_mnist_exports
    expected, views = saved_model_answer
    _, labels = fashion_mnist_test
    assert (expected.argmax(-1) == labels).mean() > 0.75  # a trained model, not chance
    assert_float_agrees(Runtime(versions[fmt], fmt).probabilities(views), expected)
    names = open(os.path.join(versions[fmt], "labels.txt")).read().splitlines()
    assert names == list(sources.FASHION_MNIST_CLASSES)


@pytest.mark.slow
@needs_export_extra
@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quantized_litert_keeps_the_answers_on_fashion_mnist(
        name, fashion_mnist_exports, fashion_mnist_test, saved_model_answer):
    _, versions = fashion_mnist_exports
    expected, views = saved_model_answer
    _, labels = fashion_mnist_test
    runtime = Runtime(versions[name], "litert")
    assert (runtime.input["dtype"] == np.int8) == (name == "int8_io")
    probabilities = runtime.probabilities(views)
    agreement = (probabilities.argmax(-1) == expected.argmax(-1)).mean()
    float_accuracy = (expected.argmax(-1) == labels).mean()
    accuracy = (probabilities.argmax(-1) == labels).mean()
    assert agreement >= 0.98, agreement
    assert abs(accuracy - float_accuracy) <= 0.01, (accuracy, float_accuracy)
    # Smaller: int8 weights are a quarter of float32's.
    size = os.path.getsize(os.path.join(versions[name], "model.tflite"))
    assert size < 0.3 * os.path.getsize(os.path.join(versions["litert"], "model.tflite"))


@pytest.mark.slow
@needs_export_extra
def test_int8_litert_computes_convolutions_and_matmuls_in_int8(fashion_mnist_exports):
    from ai_edge_litert.interpreter import Interpreter

    _, versions = fashion_mnist_exports
    interpreter = Interpreter(os.path.join(versions["int8"], "model.tflite"))
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    computing = [op for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(computing) == 5  # the cifar variant: conv1, conv2, fc6, fc7, fc8
    for op in computing:
        assert tensors[op["inputs"][0]] == np.int8 and tensors[op["inputs"][1]] == np.int8, op
    lrn = [op for op in ops if op["op_name"] == "LOCAL_RESPONSE_NORMALIZATION"]
    assert len(lrn) == 2 and all(tensors[op["inputs"][0]] == np.float32 for op in lrn)


@pytest.mark.slow
@needs_export_extra
def test_readme_deploy_code_runs_on_an_export(fashion_mnist_exports, fashion_mnist_test,
                                              saved_model_answer, tmp_path, capsys,
                                              monkeypatch):
    """The README's example, verbatim, where exports/alexnet_litert/1 is the LiteRT export and
    shirt.png a test image: it prints the class the SavedModel gives."""
    from PIL import Image

    root, _ = fashion_mnist_exports
    images, _ = fashion_mnist_test
    expected, _ = saved_model_answer
    index = int(np.nonzero(np.sort(expected, -1)[:, -1] > 0.9)[0][0])  # a clear answer
    Image.fromarray(images[index, ..., 0]).save(tmp_path / "shirt.png")
    (tmp_path / "exports").mkdir()
    os.symlink(root / "exports" / "litert", tmp_path / "exports" / "alexnet_litert")
    monkeypatch.chdir(tmp_path)
    view_code, usage = readme_deploy_blocks()[:2]
    exec(view_code + usage, {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == sources.FASHION_MNIST_CLASSES[expected[index].argmax()]


PHOTO_VARIANTS = {"paper": preprocessing.PreprocessConfig(image_size=227, resize_size=256),
                  "one_weird_trick": preprocessing.PreprocessConfig(image_size=224,
                                                                    resize_size=256)}
# Sharp enough to be peaked, not so sharp that one_weird_trick's answers saturate.
SHARPNESS = {"paper": 200, "one_weird_trick": 100}


@pytest.mark.slow
@needs_export_extra
@pytest.mark.parametrize("variant", sorted(PHOTO_VARIANTS))
def test_every_format_of_the_imagenet_models_agrees_on_photographs(variant, tmp_path):
    """Grouped towers and LRN (paper) or neither (one_weird_trick), seeded and re-centred on the
    photographs so that each has a clear answer: every float format within 1e-4 of the
    SavedModel's predict_images, LiteRT's XNNPACK delegate within 3e-4 (its own float32
    arithmetic, which these sharpened logits magnify), the same top-1 everywhere.
    Dynamic-range LiteRT: a quarter of the size, and answers (an untrained network's answers
    are differences of nearly equal logits, which int8 weights do not keep: the Fashion-MNIST
    tests above check quantized answers on a trained one)."""
    config = PHOTO_VARIANTS[variant]
    model, views, names, _, expected = decisive_photo_export(
        variant, config, SHARPNESS[variant], tmp_path / "saved_model")
    top2 = np.sort(expected, axis=-1)[:, -2:]
    assert (top2[:, 1] > 0.05).all() and (top2[:, 1] < 0.999).all(), top2  # peaked, not saturated
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all() and len(set(expected.argmax(-1))) > 2, top2
    sizes = {}
    for fmt, quantize in [("litert", "none"), ("litert", "dynamic"), ("onnx", "none"),
                          ("openvino", "none")]:
        version = formats.export(model, str(tmp_path / f"{fmt}_{quantize}"), names, config, fmt,
                                 quantize=quantize)
        sizes[fmt, quantize] = sum(os.path.getsize(os.path.join(version, f))
                                   for f in os.listdir(version))
        probabilities = Runtime(version, fmt, reference=True).probabilities(views)
        if quantize == "dynamic":
            assert probabilities.shape == expected.shape
            np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-5)
            continue
        assert_same_answers(probabilities, expected, atol=1e-4)
        if fmt == "litert":
            assert_same_answers(Runtime(version, fmt).probabilities(views), expected, atol=3e-4)
    assert sizes["litert", "dynamic"] < 0.3 * sizes["litert", "none"]

