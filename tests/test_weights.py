"""Weight import checked against PyTorch references with random weights, saved in each format."""

import json
import os
import re

import numpy as np
import pytest

from alexnet_tf import preprocessing, training, weights
from alexnet_tf.model import AlexNet
from tests.helpers import smooth_image, write_folder_tree
from tests.helpers import require, run_train, tiny_config, tiny_idx

torch = require("torch")  # a test-only dependency (extra "test")
from tests import torch_reference  # noqa: E402  (imports torch)


def assert_logits_close(actual, expected):
    scale = np.abs(expected).max()
    assert scale > 1e-3  # the comparison means something only if the logits are not ~0
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale)


def caffe_npy(reference, path, layout):
    """Saves the reference's weights as {layer: [W, b]}: "caffe" blobs or caffe-tensorflow's."""
    params = [m for m in reference if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    blobs = {}
    for name, module in zip(weights.LAYER_NAMES, params):
        w, b = module.weight.detach().numpy(), module.bias.detach().numpy()
        if layout == "caffe-tensorflow":
            if w.ndim == 4:
                w = w.transpose(2, 3, 1, 0)
            elif name == "fc6":  # rows in (H, W, C) order, as caffe-tensorflow writes them
                w = w.reshape(4096, 256, 6, 6).transpose(0, 2, 3, 1).reshape(4096, 9216).T
            else:
                w = w.T
        blobs[name] = [w, b]
    np.save(path, blobs, allow_pickle=True)


@pytest.fixture(scope="module")
def caffe_model_and_reference():
    torch.manual_seed(0)
    return AlexNet(variant="paper", lrn="caffe"), torch_reference.alexnet("paper", lrn="caffe")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["caffe-tensorflow", "caffe"])
def test_caffe_npy_matches_pytorch_reference(tmp_path, caffe_model_and_reference, layout):
    model, reference = caffe_model_and_reference
    path = str(tmp_path / "bvlc_alexnet.npy")
    caffe_npy(reference, path, layout)
    with pytest.warns(UserWarning, match="unpickling"):
        loaded = weights.load_caffe_npy(model, path, trust=True)
    assert loaded == list(weights.LAYER_NAMES)

    # Two real-looking RGB images through our eval preprocessing (Caffe convention: BGR, mean).
    rgb = np.stack([smooth_image(256, 256, seed=s) for s in (1, 2)])
    config = weights.caffe_preprocess_config()
    ours = np.stack([preprocessing.eval_image(image, config).numpy() for image in rgb])
    # The same inputs computed independently: centre 227 crop, RGB -> BGR, minus the BGR mean.
    bgr = rgb[:, 14:241, 14:241, ::-1].astype(np.float32) - np.float32([104.00698793, 116.66876762, 122.67891434])
    np.testing.assert_allclose(ours, bgr, atol=1e-3)
    assert_logits_close(model.predict(ours, verbose=0), torch_reference.logits(reference, bgr))


@pytest.mark.slow
def test_caffe_npy_needs_caffe_lrn(tmp_path, caffe_model_and_reference):
    _, reference = caffe_model_and_reference
    path = str(tmp_path / "w.npy")
    caffe_npy(reference, path, "caffe")
    with pytest.raises(weights.WeightsError, match="lrn='caffe'"):
        with pytest.warns(UserWarning):
            weights.load_caffe_npy(AlexNet(variant="paper", lrn="paper"), path, trust=True)


@pytest.mark.slow
def test_torchvision_state_dict_matches_pytorch_reference(tmp_path):
    torch.manual_seed(1)
    reference = torch_reference.TorchvisionAlexNet().eval()
    path = str(tmp_path / "alexnet.pth")
    torch.save(reference.state_dict(), path)
    model = AlexNet(variant="one_weird_trick")
    assert weights.load_torchvision(model, path) == list(weights.LAYER_NAMES)

    rgb = np.stack([smooth_image(256, 300, seed=s) for s in (3, 4)])
    config = weights.torchvision_preprocess_config()
    ours = np.stack([preprocessing.eval_image(image, config).numpy() for image in rgb])
    # torchvision: ToTensor (/255) then Normalize(mean, std), centre 224 crop of the 256 side.
    crop = rgb[:, 16:240, 38:262].astype(np.float32) / 255.0
    expected_input = (crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(ours, expected_input, atol=1e-4)
    assert_logits_close(model.predict(ours, verbose=0),
                        torch_reference.logits(reference, expected_input.astype(np.float32)))


@pytest.mark.slow
def test_new_head_keeps_fc8_and_loads_the_rest(tmp_path):
    torch.manual_seed(2)
    reference = torch_reference.TorchvisionAlexNet()
    path = str(tmp_path / "alexnet.pth")
    torch.save(reference.state_dict(), path)
    model = AlexNet(num_classes=5, variant="one_weird_trick", input_shape=(64, 64, 3))
    fc8_before = model.get_layer("fc8").kernel.numpy()
    with pytest.raises(weights.WeightsError, match="fc8"):
        weights.load_torchvision(model, path)
    loaded = weights.load_torchvision(model, path, new_head=True)
    assert loaded == list(weights.LAYER_NAMES[:-1])
    np.testing.assert_array_equal(model.get_layer("fc8").kernel.numpy(), fc8_before)
    np.testing.assert_array_equal(
        model.get_layer("fc7").kernel.numpy(), reference.classifier[4].weight.detach().numpy().T)


class _RunsCode:
    """Unpickling this object calls os.makedirs(marker): a stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_crafted_npy_is_refused_unless_trusted(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "bvlc_alexnet.npy")
    np.save(path, {"conv1": [_RunsCode(marker), np.zeros(96)]}, allow_pickle=True)
    model = AlexNet(variant="paper", lrn="caffe")
    with pytest.raises(weights.WeightsError, match="can run code"):
        weights.load_caffe_npy(model, path)
    assert not os.path.exists(marker)
    # What the refusal protects against: trusting the file runs its code.
    with pytest.warns(UserWarning, match="unpickling"), pytest.raises(Exception):
        weights.load_caffe_npy(model, path, trust=True)
    assert os.path.exists(marker)


def test_crafted_pth_is_refused(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "alexnet.pth")
    torch.save({"features.0.weight": _RunsCode(marker)}, path)
    with pytest.raises(weights.WeightsError, match="weights_only"):
        weights.load_torchvision(AlexNet(variant="one_weird_trick"), path)
    assert not os.path.exists(marker)


def test_set_trainable_rejects_unknown_layers():
    model = AlexNet(num_classes=10, variant="cifar", input_shape=(28, 28, 1), init="keras")
    assert weights.set_trainable(model, "fc7, fc8") == ["fc7", "fc8"]
    assert [l.name for l in model.layers if l.trainable_weights] == ["fc7", "fc8"]
    with pytest.raises(weights.WeightsError, match="fc9"):
        weights.set_trainable(model, "fc8,fc9")


@pytest.mark.slow
def test_fine_tune_from_checkpoint_trains_only_the_head(tiny_run, tmp_path):
    source = tiny_run
    checkpoint = os.path.join(source, "checkpoints", "last.keras")
    start = AlexNet(num_classes=10, variant="cifar", input_shape=(28, 28, 1), lrn="tf_cifar10")
    weights.load_keras(start, checkpoint)
    workdir = str(tmp_path / "finetune")
    training.train_and_evaluate(
        tiny_config(tmp_path, init_from=checkpoint, trainable="fc8", learning_rate=0.1), workdir)
    tuned = AlexNet(num_classes=10, variant="cifar", input_shape=(28, 28, 1), lrn="tf_cifar10")
    weights.load_keras(tuned, os.path.join(workdir, "checkpoints", "last.keras"))
    for name in ("conv1", "conv2", "fc6", "fc7"):
        np.testing.assert_array_equal(tuned.get_layer(name).kernel.numpy(),
                                      start.get_layer(name).kernel.numpy())
    assert not np.allclose(tuned.get_layer("fc8").kernel.numpy(),
                           start.get_layer("fc8").kernel.numpy())


@pytest.mark.slow
def test_train_py_fine_tunes_torchvision_weights_on_a_folder(tmp_path):
    torch.manual_seed(3)
    path = str(tmp_path / "alexnet.pth")
    torch.save(torch_reference.TorchvisionAlexNet().state_dict(), path)
    for split in ("train", "val"):
        write_folder_tree(str(tmp_path / "photos" / split), classes=("cat", "dog", "owl"),
                          size=(80, 90))
    workdir = str(tmp_path / "run")
    result = run_train([f"--dataset=folder:{tmp_path / 'photos'}", "--variant=one_weird_trick",
                        "--image_size=224", f"--init_from={path}", "--trainable=fc6,fc7,fc8",
                        "--batch_size=2", "--epochs=1", "--steps_per_epoch=1", "--eval_steps=1",
                        f"--workdir={workdir}"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final: top-1" in result.stdout
    with open(os.path.join(workdir, "preprocessing.json")) as f:
        pre = json.load(f)
    assert pre["mean"] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255]) and not pre["bgr"]
    assert "fc8 stays newly initialised" in result.stderr


@pytest.mark.slow
def test_train_py_weights_errors_are_one_line(tmp_path):
    npy = tmp_path / "w.npy"
    np.save(npy, {"conv1": [np.zeros(1), np.zeros(1)]}, allow_pickle=True)
    cases = [
        (["--variant=cifar", "--init_from=/nonexistent/w.pth"], "/nonexistent/w.pth: no such file"),
        (["--variant=cifar", f"--init_from={npy}"], "--variant=paper --lrn=caffe"),
        (["--variant=paper", "--lrn=caffe", "--image_size=67", "--epochs=1", "--steps_per_epoch=1",
          f"--dataset={tiny_idx(tmp_path)}", f"--init_from={npy}"], "can run code"),
    ]
    for args, message in cases:
        result = run_train([*args, f"--workdir={tmp_path / 'run'}"], cwd=str(tmp_path))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("train.py: error:") and message in last, result.stderr[-2000:]


@pytest.mark.parametrize("path, variant, lrn, message", [
    ("w.npy", "paper", "caffe", None),
    ("w.npy", "paper", "paper", "Caffe weights fit --variant=paper --lrn=caffe only"),
    ("w.npy", "single_tower", "caffe", "Caffe weights fit --variant=paper --lrn=caffe only"),
    ("w.pth", "one_weird_trick", "paper", None),
    ("w.pt", "paper", "paper", "torchvision weights fit --variant=one_weird_trick only"),
    ("run/checkpoints/best.keras", "cifar", "tf_cifar10", None),
    ("w.h5", "paper", "paper", "w.h5: unknown weights format; expected .npy (Caffe), .pth/.pt "
                               "(torchvision), .keras (Keras)"),
])
def test_each_weight_format_names_the_model_it_fits(path, variant, lrn, message):
    if message is None:
        weights.check_fits(path, variant, lrn)
    else:
        with pytest.raises(weights.WeightsError, match=re.escape(message)):
            weights.check_fits(path, variant, lrn)
    if message is None or "unknown" not in message:
        convention = weights.preprocess_config_for(path)
        assert (convention is None) == path.endswith(".keras")
