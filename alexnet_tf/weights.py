"""Pretrained weights into AlexNet models: BVLC Caffe (`bvlc_alexnet.npy`), torchvision, Keras.

Both foreign formats are pickles underneath, and unpickling a file from the internet can run
arbitrary code. So: torchvision files are read with `torch.load(weights_only=True)`, which
refuses anything but tensors; Caffe `.npy` files hold a pickled dict and are read only when the
caller says it trusts the file (`trust=True`, `--trust_weights`), with a warning.

What each set of weights expects (a model that computes something else gives wrong answers
without any error, so the loaders check what they can):

* `bvlc_alexnet.npy` (BVLC's Caffe model as converted by caffe-tensorflow, the file most
  TensorFlow AlexNet projects use): variant "paper" (227x227, two towers), `lrn="caffe"`,
  **BGR** input with the per-channel ImageNet mean in [0, 255] subtracted and no scaling
  (`caffe_preprocess_config`).
* torchvision `alexnet` state_dict (`alexnet-owt-7be5be79.pth`): variant "one_weird_trick"
  (224x224), RGB input with torchvision's mean and std (`torchvision_preprocess_config`).
"""

import dataclasses
import os
import warnings

import keras
import numpy as np
from absl import logging

from alexnet_tf import flag_facts, preprocessing
from alexnet_tf.lrn import LRN_PRESETS, LocalResponseNormalization

LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")

# torchvision.models.alexnet's state_dict keys -> our layer names.
_TORCHVISION_LAYERS = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}


# The models the imported weights were trained in: BVLC's two towers with Caffe's LRN, and
# torchvision's layout (which has no LRN).
CAFFE_VARIANT, CAFFE_LRN = "paper", "caffe"
TORCHVISION_VARIANT = "one_weird_trick"


class WeightsError(ValueError):
    """A weights file that cannot be read, is refused, or does not fit the model."""


def caffe_preprocess_config(**overrides):
    """The `PreprocessConfig` BVLC AlexNet was trained with: BGR, Caffe's mean, no std."""
    size = flag_facts.DEFAULT_IMAGE_SIZE[CAFFE_VARIANT]
    fields = dict(image_size=size, resize_size=preprocessing.resize_size_for(size), channels=3,
                  mean=preprocessing.CAFFE_MEAN_BGR, bgr=True)
    fields.update(overrides)
    return preprocessing.PreprocessConfig(**fields)


def torchvision_preprocess_config(**overrides):
    """The `PreprocessConfig` torchvision's AlexNet expects: RGB, ImageNet mean and std."""
    size = flag_facts.DEFAULT_IMAGE_SIZE[TORCHVISION_VARIANT]
    fields = dict(image_size=size, resize_size=preprocessing.resize_size_for(size), channels=3,
                  mean=preprocessing.TORCHVISION_MEAN, std=preprocessing.TORCHVISION_STD)
    fields.update(overrides)
    return preprocessing.PreprocessConfig(**fields)


def _layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        raise WeightsError(f"model {model.name!r} has no layer {name!r}") from None


def _assign(model, name, kernel, bias, source, new_head=False):
    """Sets a layer's [kernel, bias]; returns False for a head left new (see `new_head`)."""
    layer = _layer(model, name)
    expected = tuple(layer.kernel.shape), tuple(layer.bias.shape)
    if (kernel.shape, bias.shape) != expected:
        if new_head and name == "fc8" and kernel.shape[:-1] == expected[0][:-1]:
            logging.info("%s: fc8 has %d classes, the model %d: fc8 stays newly initialised",
                         source, kernel.shape[-1], expected[0][-1])
            return False
        raise WeightsError(
            f"{source}: {name} has kernel {kernel.shape} and bias {bias.shape}, the model "
            f"expects {expected[0]} and {expected[1]} (wrong variant or number of classes?)")
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return True


def _check_lrn(model, preset, source):
    expected = LRN_PRESETS[preset]
    lrns = [layer for layer in model.layers if isinstance(layer, LocalResponseNormalization)]
    for layer in lrns:
        found = (layer.depth_radius, layer.bias, layer.alpha, layer.beta)
        if not np.allclose(found, expected):
            raise WeightsError(
                f"{source}: these weights were trained with the {preset!r} LRN "
                f"{expected}; layer {layer.name} has {found}. Build the model with lrn={preset!r}")
    if not lrns:
        raise WeightsError(f"{source}: these weights were trained with LRN; build the model "
                           f"with lrn={preset!r}")


def _flattened_chw_to_hwc(kernel, channels):
    """Reorders fc6's input rows from a (C, H, W) flatten (Caffe/PyTorch) to Keras' (H, W, C)."""
    rows, units = kernel.shape
    side = int(round((rows // channels) ** 0.5))
    if channels * side * side != rows:
        raise WeightsError(f"fc6 has {rows} inputs, not {channels} x side x side")
    return kernel.reshape(channels, side, side, units).transpose(1, 2, 0, 3).reshape(rows, units)


def read_caffe_npy(path, trust=False):
    """Reads a `bvlc_alexnet.npy`-style dict {layer: [W, b]}; a pickle, so only when trusted."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    try:
        # allow_pickle=False refuses object arrays before anything is unpickled.
        np.load(path, allow_pickle=False)
        raise WeightsError(f"{path}: a plain array, not a dict of layer -> [W, b]")
    except ValueError as e:
        if isinstance(e, WeightsError):
            raise
        if "allow_pickle" not in str(e):
            raise WeightsError(f"{path}: not a NumPy .npy file ({e})") from None
    if not trust:
        raise WeightsError(
            f"{path} is a pickle (a .npy of Python objects), and loading a pickle can run code. "
            "Pass trust=True (train.py: --trust_weights) only for a file from a source you trust")
    warnings.warn(f"unpickling {path}: this runs any code the file contains", stacklevel=3)
    # encoding="latin1": the widely used file was pickled by Python 2.
    weights = np.load(path, allow_pickle=True, encoding="latin1").item()
    if not isinstance(weights, dict):
        raise WeightsError(f"{path}: expected a dict of layer -> [W, b], got {type(weights)}")
    return weights


def load_caffe_npy(model, path, trust=False, exclude=(), new_head=False):
    """Loads BVLC Caffe AlexNet weights into a `variant="paper"` model with `lrn="caffe"`.

    Accepts the caffe-tensorflow layout (conv [kh, kw, in/groups, out], fc [in, out] with fc6's
    inputs in (H, W, C) order; the widely distributed `bvlc_alexnet.npy`) and Caffe's own
    (conv [out, in/groups, kh, kw], fc [out, in] with fc6's inputs in (C, H, W) order). The model
    must then be fed BGR images minus `preprocessing.CAFFE_MEAN_BGR` (`caffe_preprocess_config()`).

    Args:
        model: an `AlexNet(variant="paper", lrn="caffe")`.
        path: the .npy file.
        trust: required: the file is a pickle and may run code when read.
        exclude: layer names to leave as they are (e.g. ("fc8",) for a new classifier head).
        new_head: leave fc8 as it is when its number of classes differs from the file's.

    Returns:
        The names of the layers loaded.

    Example:
        >>> model = AlexNet(variant="paper", lrn="caffe")
        >>> load_caffe_npy(model, "bvlc_alexnet.npy", trust=True)  # doctest: +SKIP
    """
    weights = read_caffe_npy(path, trust)
    _check_lrn(model, CAFFE_LRN, path)
    missing = [name for name in LAYER_NAMES if name not in weights and name not in exclude]
    if missing:
        raise WeightsError(f"{path}: no weights for {', '.join(missing)}")
    # The layout is the file's, not the layer's: fc7's square kernel cannot tell, conv1's can.
    caffe_layout = np.shape(weights["conv1"][0]) != tuple(_layer(model, "conv1").kernel.shape)
    loaded = []
    for name in LAYER_NAMES:
        if name in exclude:
            continue
        kernel, bias = (np.asarray(w) for w in weights[name])
        if caffe_layout and kernel.ndim == 4:  # [out, in, kh, kw] -> [kh, kw, in, out]
            kernel = kernel.transpose(2, 3, 1, 0)
        elif caffe_layout and kernel.ndim == 2:  # InnerProduct [out, in] -> [in, out]
            kernel = kernel.T
            if name == "fc6":  # Caffe flattened pool5 as (C, H, W)
                kernel = _flattened_chw_to_hwc(kernel, _layer(model, "conv5").filters)
        if _assign(model, name, kernel, bias, path, new_head):
            loaded.append(name)
    return loaded


def read_torchvision(path):
    """Reads a torchvision AlexNet state_dict with `torch.load(weights_only=True)`."""
    try:
        import torch
    except ImportError:
        raise WeightsError("reading .pth files needs PyTorch: pip install 'alexnet_tf[torch]'") from None
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for refused objects, others for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: refused or unreadable by torch.load(weights_only=True): "
                           f"{first_line}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v.detach().numpy() for k, v in state.items()}


def load_torchvision(model, path, exclude=(), new_head=False):
    """Loads a torchvision `alexnet` state_dict (.pth) into a `variant="one_weird_trick"` model.

    The model must then be fed RGB images normalised with torchvision's mean and std
    (`torchvision_preprocess_config()`).

    Args:
        model: an `AlexNet(variant="one_weird_trick")`.
        path: the .pth file (e.g. torchvision's `alexnet-owt-7be5be79.pth`).
        exclude: layer names to leave as they are (e.g. ("fc8",) for a new classifier head).
        new_head: leave fc8 as it is when its number of classes differs from the file's.

    Returns:
        The names of the layers loaded.
    """
    state = read_torchvision(path)
    loaded = []
    for prefix, name in _TORCHVISION_LAYERS.items():
        if name in exclude:
            continue
        if f"{prefix}.weight" not in state:
            raise WeightsError(f"{path}: no {prefix}.weight: not a torchvision AlexNet state_dict")
        kernel, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        if kernel.ndim == 4:
            kernel = kernel.transpose(2, 3, 1, 0)
        else:
            kernel = kernel.T
            if name == "fc6":
                kernel = _flattened_chw_to_hwc(kernel, _layer(model, "conv5").filters)
        if _assign(model, name, kernel, bias, path, new_head):
            loaded.append(name)
    return loaded


def load_keras(model, path, exclude=(), new_head=False):
    """Copies weights by layer name from a saved Keras model (e.g. a run's checkpoints/best.keras).

    Layers of `model` missing from the checkpoint are left as they are; a layer whose weights do
    not fit is an error unless excluded (or fc8 with `new_head`).
    """
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    source = keras.models.load_model(path, compile=False)
    names = {layer.name for layer in source.layers}
    loaded = []
    for layer in model.layers:
        if layer.name in exclude or layer.name not in names or not layer.weights:
            continue
        values = source.get_layer(layer.name).get_weights()
        shapes = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != shapes:
            if new_head and layer.name == "fc8":
                logging.info("%s: fc8 has other classes: fc8 stays newly initialised", path)
                continue
            raise WeightsError(f"{path}: {layer.name} has weights {[v.shape for v in values]}, "
                               f"the model expects {shapes}")
        layer.set_weights(values)
        loaded.append(layer.name)
    return loaded


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A kind of weights file: how it loads and what model and input it needs.

    Attributes:
        name: for messages.
        suffixes: file name endings.
        load: load(model, path, exclude=..., new_head=..., [trust=...]) -> loaded layer names.
        pickled: unpickling it can run code (load takes `trust`).
        variant, lrn: the model the weights were trained in (None: any).
        preprocess: its input convention, a PreprocessConfig factory (None: the run's own).
    """

    name: str
    suffixes: tuple
    load: object
    pickled: bool = False
    variant: str | None = None
    lrn: str | None = None
    preprocess: object = None


WEIGHT_FORMATS = (
    WeightFormat("Caffe", (".npy",), load_caffe_npy, pickled=True, variant=CAFFE_VARIANT,
                 lrn=CAFFE_LRN, preprocess=caffe_preprocess_config),
    WeightFormat("torchvision", (".pth", ".pt"), load_torchvision, variant=TORCHVISION_VARIANT,
                 preprocess=torchvision_preprocess_config),
    WeightFormat("Keras", (".keras",), load_keras),
)


def weight_format(path):
    """The WeightFormat of `path`, by its name; WeightsError for an unknown kind."""
    for kind in WEIGHT_FORMATS:
        if path.endswith(kind.suffixes):
            return kind
    known = ", ".join(f"{'/'.join(kind.suffixes)} ({kind.name})" for kind in WEIGHT_FORMATS)
    raise WeightsError(f"{path}: unknown weights format; expected {known}")


def check_fits(path, variant, lrn):
    """WeightsError when weights from `path` were trained in another variant or LRN preset."""
    kind = weight_format(path)
    wanted = {"variant": kind.variant, "lrn": kind.lrn}
    if (kind.variant or variant) != variant or (kind.lrn or lrn) != lrn:
        raise WeightsError(f"{kind.name} weights fit " + " ".join(
            f"--{key}={value}" for key, value in wanted.items() if value) + " only")


def load_weights(model, path, trust=False, exclude=(), new_head=False):
    """Loads `path` by its kind (WEIGHT_FORMATS): Caffe .npy, torchvision .pth/.pt, .keras."""
    kind = weight_format(path)
    extra = {"trust": trust} if kind.pickled else {}
    loaded = kind.load(model, path, exclude=exclude, new_head=new_head, **extra)
    logging.info("Loaded %s from %s", ", ".join(loaded), path)
    return loaded


def preprocess_config_for(path, **overrides):
    """The input convention weights from `path` were trained with, or None for our own runs."""
    kind = weight_format(path)
    return kind.preprocess(**overrides) if kind.preprocess else None


def set_trainable(model, trainable):
    """Freezes every layer with weights except those named in `trainable` ("all": none frozen).

    Args:
        trainable: "all" or a comma-separated list of layer names, e.g. "fc6,fc7,fc8".

    Returns:
        The names of the trainable layers.
    """
    with_weights = [layer for layer in model.layers if layer.weights]
    if trainable == "all":
        return [layer.name for layer in with_weights]
    names = [n.strip() for n in trainable.split(",") if n.strip()]
    unknown = sorted(set(names) - {layer.name for layer in with_weights})
    if unknown:
        raise WeightsError(f"--trainable names {', '.join(unknown)}, not layers with weights of "
                           f"{model.name} ({', '.join(l.name for l in with_weights)})")
    for layer in with_weights:
        layer.trainable = layer.name in names
    return names
