"""The facts the command lines are made of: the choices and limits their flags offer, as plain
data.

This module imports nothing; the modules that act on a fact take it from here: one definition
each. Importing it through the package starts TensorFlow (alexnet_tf/__init__.py imports the
model, whose layers Keras must know to load a checkpoint), so export.py, whose flags parse before
TensorFlow starts, loads it (and cli) on its own.
"""

# Weight initialisations (model.py): paper §5, BVLC Caffe's solver, Keras' defaults.
INITS = ("paper", "caffe", "keras")

# Each variant's input side (height = width): the size it was designed for, and the least its
# layers take (see AlexNet's docstring for the variants).
VARIANT_SIZES = {
    # 224 in the paper's text, but 227 is what makes conv1's 55x55 output (Caffe); conv1..pool5
    # need 67.
    "paper": (227, 67),
    "single_tower": (227, 67),
    # torchvision / cuda-convnet2 pad conv1 by 2 instead; Keras' adaptive pooling cannot
    # upsample, so pool5 must be at least 6x6.
    "one_weird_trick": (224, 223),
    "cifar": (32, 8),  # two 2x poolings
    "small": (32, 19),  # two VALID 5x5 convolutions and poolings
}
VARIANTS = tuple(VARIANT_SIZES)
DEFAULT_IMAGE_SIZE = {variant: sizes[0] for variant, sizes in VARIANT_SIZES.items()}
MIN_IMAGE_SIZE = {variant: sizes[1] for variant, sizes in VARIANT_SIZES.items()}

# LRN presets (lrn.py): (depth_radius, bias k, alpha, beta) as tf.nn.local_response_normalization
# takes them.
LRN_PRESETS = {
    # Paper §3.3 as printed: k=2, n=5 (radius 2), alpha=1e-4, beta=0.75.
    "paper": (2, 2.0, 1e-4, 0.75),
    # Caffe / cuda-convnet divide alpha by n=5 and Caffe uses k=1; BVLC weights expect this.
    "caffe": (2, 1.0, 2e-5, 0.75),
    # The classic TensorFlow CIFAR-10 tutorial model (tensorflow/models cifar10.py, norm1/norm2).
    "tf_cifar10": (4, 1.0, 0.001 / 9.0, 0.75),
}

# The training crops, each cut by its function (preprocessing.random_crop). The photo crops are
# what train.py's --crop chooses from; "pad" is the one for small images.
CROP_SCHEMES = ("paper", "inception", "pad")
PHOTO_CROP_SCHEMES = CROP_SCHEMES[:2]

# The most pixels an image may declare in its header for the pipelines and the exported
# signatures to decode it. Decoding allocates height x width x channels bytes and the float32
# copy four times that: about 0.6 GB at the limit. 40 MP (7,300 x 5,500) is beyond the photographs
# of most phones and cameras, and the models see 227-pixel crops; what is larger is a
# decompression bomb (a few-KB PNG can declare 50,000 x 50,000) or should be scaled down first.
MAX_PIXELS = 40_000_000

# The kinds of --dataset (sources.py): each prefix, the argument it takes, and whether the
# argument is required.
SOURCE_KINDS = {
    "tfds": ("<name>", True),
    "tfrecord": ("<glob>", True),
    "folder": ("<path>", True),
    "prepared": ("<dir>", True),
    "fashion_mnist": ("[:<dir>]", False),
    "mnist": ("[:<dir>]", False),
}
SOURCE_KINDS_HELP = " | ".join(f"{kind}:{arg}" if required else f"{kind}{arg}"
                               for kind, (arg, required) in SOURCE_KINDS.items())

# export.py's formats: the SavedModel (TF Serving), and the files of the others (formats.py).
MODEL_FILES = {"litert": "model.tflite", "onnx": "model.onnx", "openvino": "model.xml"}
FORMATS = ("saved_model", *MODEL_FILES)
# LiteRT's quantizations: none, int8 weights with float activations, full-integer.
QUANTIZATIONS = ("none", "dynamic", "int8")
# Training images (evaluation views) that calibrate a full-integer LiteRT file.
CALIBRATION_IMAGES = 300


def quantize_mistake(fmt, quantize):
    """What is wrong with a quantization asked of `fmt`, or None: only LiteRT files are
    quantized."""
    if quantize != "none" and fmt != "litert":
        return f"--quantize={quantize} is for --format=litert, not {fmt}"
    return None
