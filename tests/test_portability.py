"""Every variant with TensorFlow's oneDNN CPU kernels off and on, and exports loaded as TF Serving
loads them.

TensorFlow turns oneDNN on by default only on some CPUs (Intel with AVX512-VNNI/BF16/AMX), so the
rest of the suite runs with whichever setting this machine has. Here each setting runs in its own
process (portability_worker.py): training, evaluation, prediction and export of every variant,
then the exports of the paper, one_weird_trick and cifar runs go through
tests/native/load_saved_model.cc, a C++ program that loads them with the C++ SavedModel loader,
tag "serve", XLA disabled, as tensorflow_model_server does.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import ROOT, build_c_loader, encode, run_measured, smooth_image
SETTINGS = ("0", "1")  # TF_ENABLE_ONEDNN_OPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def loader(tmp_path_factory):
    """tests/native/load_saved_model.cc built against this TensorFlow wheel's C API."""
    try:
        return build_c_loader(str(tmp_path_factory.mktemp("loader") / "load_saved_model"))
    except RuntimeError as e:
        pytest.fail(str(e))


def environment(onednn):
    return dict(os.environ, PYTHONPATH=ROOT, TF_ENABLE_ONEDNN_OPTS=onednn,
                TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="session", params=SETTINGS, ids=lambda s: f"onednn{s}")
def worker(request, tmp_path_factory):
    """(oneDNN setting, the worker's report) for each setting."""
    out_dir = tmp_path_factory.mktemp(f"onednn{request.param}")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "portability_worker.py"), str(out_dir)],
        env=environment(request.param), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out_dir / "report.json") as f:
        yield request.param, json.load(f)
    # About 1.6 GB of full-size checkpoints and exports per setting.
    shutil.rmtree(out_dir, ignore_errors=True)


def run_loader(loader, onednn, export, images, signature="serving_default"):
    return subprocess.run([loader, export, signature, *images], env=environment(onednn),
                          capture_output=True, text=True, timeout=300)


def test_the_setting_reaches_tensorflow(worker):
    onednn, report = worker
    assert report["onednn"] == (onednn == "1")


def test_every_variant_trains_evaluates_and_predicts(worker):
    _, report = worker
    assert sorted(report["variants"]) == sorted(["paper", "single_tower", "one_weird_trick",
                                                 "cifar", "small"])
    for variant, (train_loss, eval_loss) in report["variants"].items():
        assert np.isfinite([train_loss, eval_loss]).all(), variant


def test_native_grouped_conv_trains_with_onednn_and_refuses_to_build_without(worker):
    onednn, report = worker
    if onednn == "1" or report["gpu"]:
        assert report["native"] == "trained"
    else:
        assert "needs TensorFlow's oneDNN CPU kernels" in report["native"]


@pytest.mark.parametrize("variant, images", [("paper", "rgb_images"),
                                             ("one_weird_trick", "rgb_images"),
                                             ("cifar", "gray_images")])
def test_c_api_loader_serves_what_python_serves(worker, loader, variant, images):
    onednn, report = worker
    run = report[variant]
    result = run_loader(loader, onednn, run["export"], report[images])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 problem(s)" in result.stderr  # the op audit: standard, registered ops only
    served = json.loads(result.stdout)
    expected = np.asarray(run["probabilities"])
    assert np.abs(np.asarray(served["probabilities"]) - expected).max() <= 1e-4
    assert served["class_ids"] == run["class_ids"]
    assert set(served) == {"probabilities", "classes", "class_ids", "scores"}


def test_c_api_loader_refuses_bytes_that_are_not_an_image(worker, loader, tmp_path):
    onednn, report = worker
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    result = run_loader(loader, onednn, report["cifar"]["export"], [str(garbage)])
    assert result.returncode == 3
    assert "TensorFlow error 3:" in result.stderr  # INVALID_ARGUMENT


def test_c_api_loader_refuses_oversized_images_before_decoding(worker, loader, hostile_images):
    onednn, report = worker
    export = report["paper"]["export"]

    def serve(image):
        return run_measured([loader, export, "serving_default", hostile_images[image]],
                            env=environment(onednn))

    status, _, stderr, baseline = serve("small")
    assert status == 0, stderr[-2000:]
    for bomb in ("png_bomb", "jpeg_bomb"):
        status, _, stderr, peak = serve(bomb)
        assert status == 3 and "TensorFlow error 3:" in stderr, stderr[-2000:]  # INVALID_ARGUMENT
        assert "image of 400000000 pixels is over the limit of 40000000 pixels" in stderr
        assert peak - baseline < 100, (bomb, peak, baseline)
    status, stdout, stderr, _ = serve("photo")  # 12 megapixels, within the budget
    assert status == 0, stderr[-2000:]
    probabilities = np.asarray(json.loads(stdout)["probabilities"])
    assert probabilities.shape == (1, 3) and abs(probabilities.sum() - 1) < 1e-5


def test_c_api_loader_audit_finds_xla_functions(loader, tmp_path):
    # The audit must be able to fail: a SavedModel whose function is XLA-compiled.
    class Jitted(tf.Module):
        @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, image_bytes):
            return {"length": tf.strings.length(image_bytes)}

    module = Jitted()
    path = str(tmp_path / "jitted")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    image = tmp_path / "x.png"
    image.write_bytes(encode(smooth_image(8, 8), "png"))
    result = run_loader(loader, "0", path, [str(image)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "_XlaMustCompile" in result.stderr
