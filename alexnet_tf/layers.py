"""Grouped 2-D convolution that stays on TensorFlow's fast convolution kernels.

Keras 3's `Conv2D(groups>1)` on the TensorFlow backend wraps the convolution in an XLA-compiled
function on CPU, which measured about 8x slower (forward+backward) than a plain convolution of
the same size on a 2-core machine. `tf.nn.conv2d` accepts grouped filters directly (the input
has `groups` times the filter's input channels) and runs on oneDNN / cuDNN without XLA.
"""

import keras
import tensorflow as tf

IMPLEMENTATIONS = ("native", "split")


@keras.saving.register_keras_serializable(package="alexnet_tf")
class GroupedConv2D(keras.layers.Conv2D):
    """A `keras.layers.Conv2D` with `groups` computed by `tf.nn.conv2d` instead of Keras' XLA path.

    Weights have the same shape and meaning as `keras.layers.Conv2D(groups=...)`:
    kernel `[kh, kw, in_channels // groups, filters]`; output channels `[g * filters // groups,
    (g + 1) * filters // groups)` see only input channels of group `g` (paper §3.5, Figure 2).

    Args:
        filters, kernel_size, strides, padding, groups, ...: as for `keras.layers.Conv2D`
            (channels_last only).
        implementation: "native" passes the grouped kernel to one `tf.nn.conv2d`; "split" runs one
            `tf.nn.conv2d` per group and concatenates (the original two-GPU towers).

    Example:
        >>> conv = GroupedConv2D(256, 5, padding="same", groups=2, name="conv2")
        >>> conv(tf.zeros([1, 27, 27, 96])).shape
        TensorShape([1, 27, 27, 256])
    """

    def __init__(self, *args, implementation="native", **kwargs):
        super().__init__(*args, **kwargs)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
            )
        if self.data_format != "channels_last":
            raise ValueError("GroupedConv2D supports data_format='channels_last' only")
        self.implementation = implementation

    def convolution_op(self, inputs, kernel):
        conv_kwargs = dict(
            strides=[1, *self.strides, 1],
            padding=self.padding.upper(),
            dilations=[1, *self.dilation_rate, 1],
        )
        if self.groups == 1 or self.implementation == "native":
            return tf.nn.conv2d(inputs, kernel, **conv_kwargs)
        towers = zip(tf.split(inputs, self.groups, axis=-1), tf.split(kernel, self.groups, axis=-1))
        return tf.concat([tf.nn.conv2d(x, k, **conv_kwargs) for x, k in towers], axis=-1)

    def get_config(self):
        config = super().get_config()
        config["implementation"] = self.implementation
        return config
