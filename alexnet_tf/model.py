"""The AlexNet model family (Krizhevsky, Sutskever & Hinton, NIPS 2012) as Keras functional models."""

import keras
import tensorflow as tf

from alexnet_tf import layers as alexnet_layers
from alexnet_tf.flag_facts import DEFAULT_IMAGE_SIZE, INITS, VARIANTS
from alexnet_tf.layers import Conv2D, GroupedConv2D
from alexnet_tf.lrn import LRN_PRESETS, LocalResponseNormalization


# Paper §5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers,
# as well as in the fully-connected hidden layers, with the constant 1 ... remaining layers with 0."
_BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def _initializers(init, name):
    """Returns (kernel_initializer, bias_initializer) for layer `name` under scheme `init`."""
    if init == "keras":
        return "glorot_uniform", "zeros"
    weight_std = 0.01  # paper §5: "zero-mean Gaussian distribution with standard deviation 0.01"
    bias = 1.0 if name in _BIAS_ONE_LAYERS else 0.0
    if init == "caffe":
        # BVLC's train_val.prototxt: bias 1 gave a flat loss, so 0.1; fc6/fc7 weights std 0.005.
        bias = 0.1 if name in _BIAS_ONE_LAYERS else 0.0
        if name in ("fc6", "fc7"):
            weight_std = 0.005
    return keras.initializers.RandomNormal(0.0, weight_std), keras.initializers.Constant(bias)


def AlexNet(num_classes=1000, variant="paper", input_shape=None, lrn="paper", init="paper",
            dropout=0.5, include_top=True, name=None, grouped_conv_implementation="split",
            lrn_implementation="auto", dense_implementation="auto"):
    """Builds an AlexNet `keras.Model`.

    The model outputs **logits** (fc8 without softmax): training uses
    `SparseCategoricalCrossentropy(from_logits=True)`, which is numerically stabler than a softmax
    followed by a log, and the exported serving signature applies the softmax itself. Under a
    mixed-precision policy fc8 computes in float32 so the logits are float32.

    Args:
        num_classes: size of fc8.
        variant: "paper" (two towers: conv2/4/5 in 2 groups, LRN; 60,965,224 parameters at 1000
            classes, the BVLC Caffe count), "single_tower" (same widths, no groups; 62,378,344),
            "one_weird_trick" (torchvision's 64/192/384/256/256 layout, no LRN, 224 input, adaptive
            average pool to 6x6; 61,100,840), "cifar" (the two-conv model of the TensorFlow CIFAR-10
            tutorial: 5x5 SAME convolutions, LRN, fc 384/192; 1,756,426 at 32x32x3 and 10 classes)
            or "small" (the small AlexNet this project's seed write-up prints, a PyTorch model for
            32x32 images: 5x5 VALID convolutions of 64 and 64 filters, no LRN, no dropout,
            fc 1024 -> 384 -> 192; 576,778). Both small ones also take 28x28 images.
        input_shape: `(height, width, channels)`; defaults to the variant's size with 3 channels.
            Any channel count works. With `include_top=False` height and width may be None.
        lrn: LRN preset ("paper", "caffe", "tf_cifar10") or None to leave LRN out. Ignored by
            "one_weird_trick" and "small", which have none.
        init: "paper" (N(0, 0.01) weights, biases 1 in conv2/4/5 and fc6/7, paper §5), "caffe"
            (BVLC: those biases 0.1, fc6/fc7 weights N(0, 0.005)) or "keras" (Keras defaults).
        dropout: dropout rate before fc7 and fc8 (paper §4.2: 0.5); 0 disables it. Ignored by
            "small", which has none.
        include_top: False returns the convolutional feature extractor (output of pool5).
        name: model name; defaults to "alexnet_<variant>".
        grouped_conv_implementation: "split" (the towers, runs everywhere) or "native" (one
            grouped convolution: oneDNN or GPU only); see `GroupedConv2D`.
        lrn_implementation: "auto", "fused" or "tf"; see `LocalResponseNormalization`.
        dense_implementation: "auto", "eigen" or "tf" for fc6-fc8; see `layers.Dense`.

    Returns:
        A `keras.Model` with layers named conv1..conv5, lrn1, lrn2, pool1, pool2, pool5, fc6, fc7,
        fc8, so weights can be mapped from Caffe and torchvision by name.

    Example:
        >>> model = AlexNet(num_classes=10, variant="cifar", input_shape=(28, 28, 1), init="keras")
        >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> model.output_shape
        (None, 10)
    """
    input_shape = _validated_input_shape(variant, input_shape, init, lrn, dropout, include_top)
    blocks = _Blocks(init, lrn, grouped_conv_implementation, lrn_implementation,
                     dense_implementation)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x, hidden = _FEATURES[variant](blocks, inputs, include_top)
    if include_top:
        x = _head(blocks, x, hidden, 0.0 if variant == "small" else dropout, num_classes)
    return keras.Model(inputs, x, name=name or f"alexnet_{variant}")


def _validated_input_shape(variant, input_shape, init, lrn, dropout, include_top):
    """`input_shape`, or the variant's own, once every argument is known to be valid."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown AlexNet variant {variant!r}; choose one of {VARIANTS}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if lrn is not None and lrn not in LRN_PRESETS:
        raise ValueError(f"unknown LRN preset {lrn!r}; choose one of {sorted(LRN_PRESETS)} or None")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if input_shape is None:
        size = DEFAULT_IMAGE_SIZE[variant]
        input_shape = (size, size, 3)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    if include_top and None in input_shape[:2]:
        raise ValueError("include_top=True needs a fixed input height and width")
    return input_shape


class _Blocks:
    """The layers every variant is made of, named and initialised as AlexNet's arguments say."""

    def __init__(self, init, lrn, grouped_conv_implementation, lrn_implementation,
                 dense_implementation):
        self.init, self.lrn = init, lrn
        self.grouped_conv_implementation = grouped_conv_implementation
        self.lrn_implementation = lrn_implementation
        self.dense_implementation = dense_implementation

    def conv(self, x, filters, kernel_size, name, strides=1, padding="same", groups=1):
        kernel_init, bias_init = _initializers(self.init, name)
        kwargs = dict(strides=strides, padding=padding, activation="relu",
                      kernel_initializer=kernel_init, bias_initializer=bias_init, name=name)
        if groups > 1:
            return GroupedConv2D(filters, kernel_size, groups=groups,
                                 implementation=self.grouped_conv_implementation, **kwargs)(x)
        return Conv2D(filters, kernel_size, **kwargs)(x)

    def norm(self, x, name):
        if self.lrn is None:
            return x
        return LocalResponseNormalization.from_preset(
            self.lrn, implementation=self.lrn_implementation, name=name)(x)

    def pool(self, x, name, padding="valid"):
        # Overlapping pooling, paper §3.4: z=3, s=2.
        return keras.layers.MaxPool2D(pool_size=3, strides=2, padding=padding, name=name)(x)

    def dense(self, x, units, name, **kwargs):
        kernel_init, bias_init = _initializers(self.init, name)
        return alexnet_layers.Dense(units, implementation=self.dense_implementation,
                                    kernel_initializer=kernel_init, bias_initializer=bias_init,
                                    name=name, **kwargs)(x)


# The features of each variant, conv1 to its last pooling: (features, fc6 and fc7 widths).


def _two_tower_features(b, inputs, include_top, groups=2):
    x = b.conv(inputs, 96, 11, "conv1", strides=4, padding="valid")
    x = b.pool(b.norm(x, "lrn1"), "pool1")
    x = b.conv(x, 256, 5, "conv2", groups=groups)
    x = b.pool(b.norm(x, "lrn2"), "pool2")
    x = b.conv(x, 384, 3, "conv3")  # paper §3.5: conv3 sees both towers
    x = b.conv(x, 384, 3, "conv4", groups=groups)
    x = b.conv(x, 256, 3, "conv5", groups=groups)
    return b.pool(x, "pool5"), (4096, 4096)


def _one_weird_trick_features(b, inputs, include_top):
    x = keras.layers.ZeroPadding2D(2, name="pad1")(inputs)
    x = b.pool(b.conv(x, 64, 11, "conv1", strides=4, padding="valid"), "pool1")
    x = b.pool(b.conv(x, 192, 5, "conv2"), "pool2")
    x = b.conv(x, 384, 3, "conv3")
    x = b.conv(x, 256, 3, "conv4")
    x = b.pool(b.conv(x, 256, 3, "conv5"), "pool5")
    if include_top:
        x = keras.layers.AdaptiveAveragePooling2D((6, 6), name="avgpool")(x)
    return x, (4096, 4096)


def _cifar_features(b, inputs, include_top):
    # tensorflow/models tutorials/image/cifar10 (SAME padding throughout).
    x = b.conv(inputs, 64, 5, "conv1")
    x = b.norm(b.pool(x, "pool1", padding="same"), "lrn1")
    x = b.conv(x, 64, 5, "conv2")
    return b.pool(b.norm(x, "lrn2"), "pool2", padding="same"), (384, 192)


def _small_features(b, inputs, include_top):
    # As the seed write-up prints it: 32 -> 28 -> 13 -> 9 -> 4, and 4*4*64 = 1024.
    x = b.pool(b.conv(inputs, 64, 5, "conv1", padding="valid"), "pool1")
    return b.pool(b.conv(x, 64, 5, "conv2", padding="valid"), "pool2"), (384, 192)


_FEATURES = {
    "paper": _two_tower_features,
    "single_tower": lambda b, inputs, include_top: _two_tower_features(b, inputs, include_top, 1),
    "one_weird_trick": _one_weird_trick_features,
    "cifar": _cifar_features,
    "small": _small_features,
}


def _head(b, x, hidden, dropout, num_classes):
    """fc6 and fc7 (ReLU, each followed by dropout), and fc8's logits."""
    x = keras.layers.Flatten(name="flatten")(x)
    for name, units in zip(("fc6", "fc7"), hidden):
        x = b.dense(x, units, name, activation="relu")
        if dropout:
            x = keras.layers.Dropout(dropout, name=name.replace("fc", "drop"))(x)
    policy = keras.config.dtype_policy()
    # float32 logits under mixed precision: softmax/cross-entropy are unstable in float16.
    return b.dense(x, num_classes, "fc8",
                   dtype="float32" if policy.compute_dtype != policy.variable_dtype else None)


def crop_averaged_probabilities(model, crops):
    """Paper §4.1 test-time averaging: the mean softmax over each image's crops.

    Args:
        model: an AlexNet (outputs logits).
        crops: [N, K, H, W, C], e.g. the K = 10 views of `preprocessing.ten_crop`.

    Returns:
        float32 [N, classes].
    """
    shape = tf.shape(crops)
    logits = model(tf.reshape(crops, tf.concat([[-1], shape[2:]], 0)), training=False)
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
    return tf.reduce_mean(tf.reshape(probabilities, [shape[0], shape[1], -1]), axis=1)
