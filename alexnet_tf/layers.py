"""Layers that keep AlexNet on TensorFlow's fast kernels: convolutions, grouped convolution and
dense layers.

Keras 3's `Conv2D(groups>1)` on the TensorFlow backend wraps the convolution in an XLA-compiled
function on CPU, several times slower than plain convolutions of the same size. `GroupedConv2D`
computes the groups as the paper's towers of plain convolutions instead, which every TensorFlow
CPU and GPU kernel runs.

On CPU, oneDNN's float32 GEMM is slow for the fully connected layers' short, wide products at
small batches, and Eigen's is faster: `Dense` routes them there in training. Without oneDNN,
Eigen's convolution backprop kernels take about twice as long as forward convolutions of the
same work: `Conv2D` computes its training gradients as forward convolutions there. BENCHMARKS.md
has the measurements behind each.
"""

import contextlib
import threading

import keras
import tensorflow as tf

from alexnet_tf import devices
from alexnet_tf.keras_compat import onednn_enabled  # noqa: F401  (layers.onednn_enabled)

GROUPED_CONV_IMPLEMENTATIONS = ("split", "native")
DENSE_IMPLEMENTATIONS = ("auto", "eigen", "tf")

_state = threading.local()


@contextlib.contextmanager
def standard_ops():
    """Inside this context, alexnet_tf's layers compute (and trace) TensorFlow's standard ops
    whatever their implementation: `tf.nn.local_response_normalization` (not an XLA-compiled
    function) and `tf.matmul` (not `SparseMatMul`, which has no GPU kernel).

    For graphs that leave this process: `serving.export_saved_model` traces its signatures
    inside it, so SavedModels hold only standard ops, which TF Serving runs on any device.
    """
    previous = getattr(_state, "standard", False)
    _state.standard = True
    try:
        yield
    finally:
        _state.standard = previous


def using_standard_ops():
    """Whether the calling thread is inside `standard_ops()`."""
    return getattr(_state, "standard", False)


@tf.custom_gradient
def eigen_matmul(x, w):
    """x @ w for float32 [B, K] x [K, N] through Eigen (`SparseMatMul` with no sparsity hint: the
    one float32 GEMM kernel that TensorFlow's oneDNN rewrite leaves alone), gradients too.

    Same values as `tf.matmul` up to float32 summation order. The input gradient is computed as
    (w @ dy^T)^T: `SparseMatMul` with `transpose_b` on the large operand measured several times
    slower.
    """
    y = tf.raw_ops.SparseMatMul(a=x, b=w)

    def grad(dy):
        dx = tf.transpose(tf.raw_ops.SparseMatMul(a=w, b=dy, transpose_b=True))
        dw = tf.raw_ops.SparseMatMul(a=x, b=dy, transpose_a=True)
        return dx, dw

    return y, grad


def conv2d_forward_gradients(x, kernel, padding):
    """`tf.nn.conv2d(x, kernel, 1, padding)` (stride and dilation 1, ungrouped) whose gradients
    are forward convolutions: the input gradient convolves dy with the kernel flipped and its
    channels swapped; the kernel gradient convolves x, batch and channels swapped, with dy as the
    kernel. Same values as TensorFlow's backprop kernels up to float32 summation order; on a CPU
    without oneDNN about twice as fast as Eigen's (BENCHMARKS.md).
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    top = left = bottom = right = 0
    if padding == "SAME":  # TensorFlow pads (k - 1) // 2 before and the rest after
        top, left = (kh - 1) // 2, (kw - 1) // 2
        bottom, right = kh - 1 - top, kw - 1 - left

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
            dx = tf.nn.conv2d(dy, flipped, 1, [[0, 0], [kh - 1 - top, kh - 1 - bottom],
                                               [kw - 1 - left, kw - 1 - right], [0, 0]])
            dw = tf.nn.conv2d(tf.transpose(x, [3, 1, 2, 0]), tf.transpose(dy, [1, 2, 0, 3]), 1,
                              [[0, 0], [top, bottom], [left, right], [0, 0]])
            return dx, tf.transpose(dw, [1, 2, 0, 3])

        return tf.nn.conv2d(x, kernel, 1, padding), grad

    return conv(x, kernel)


@keras.saving.register_keras_serializable(package="alexnet_tf")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense` whose float32 matmul runs on Eigen's CPU GEMM instead of oneDNN's in
    training.

    Same weights, values and gradients (to float32 rounding). Measured on the paper model
    (batch 32, 2-core CPU, `compile`/`fit`): faster training (BENCHMARKS.md). Not in inference
    (training=False): there it measured no faster at batch 32 and slower at batch 1.

    Args:
        units, activation, ...: as for `keras.layers.Dense`.
        implementation: "eigen", "tf" (`keras.layers.Dense` as it is) or "auto" ("eigen" when no
            GPU is visible). "eigen" applies to training calls with 2-D float32 inputs; other
            dtypes (mixed precision computes in bfloat16/float16, where oneDNN is fast), LoRA or
            quantized layers, and anything traced inside `standard_ops()` use Keras' own path.
    """

    def __init__(self, units, implementation="auto", **kwargs):
        super().__init__(units, **kwargs)
        if implementation not in DENSE_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {DENSE_IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.implementation = implementation

    def build(self, input_shape):
        super().build(input_shape)
        implementation = self.implementation
        if implementation == "auto":
            implementation = devices.dense_implementation(devices.DeviceFacts.of_this_machine())
        self._eigen = implementation == "eigen" and hasattr(tf.raw_ops, "SparseMatMul")

    def call(self, inputs, training=None):
        if (not training or not self._eigen or using_standard_ops()
                or self.compute_dtype != "float32" or inputs.shape.rank != 2
                or getattr(self, "lora_enabled", False)
                or getattr(self, "quantization_mode", None) is not None):
            return super().call(inputs, training=training)
        x = eigen_matmul(inputs, tf.convert_to_tensor(self.kernel))
        if self.bias is not None:
            x = tf.nn.bias_add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        config = super().get_config()
        config["implementation"] = self.implementation
        return config


@keras.saving.register_keras_serializable(package="alexnet_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` (channels_last) whose training gradients are forward convolutions
    (`conv2d_forward_gradients`) where `devices.conv_gradients` says so: on a CPU without
    oneDNN, for stride and dilation 1. Same weights and values; anything traced inside
    `standard_ops()` (exports) is one plain `tf.nn.conv2d`."""

    def build(self, input_shape):
        super().build(input_shape)
        self._forward_gradients = (
            devices.conv_gradients(devices.DeviceFacts.of_this_machine()) == "forward"
            and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1))

    def _conv(self, inputs, kernel):
        padding = self.padding.upper()
        if (self._forward_gradients and not using_standard_ops()
                and kernel.shape[2] == inputs.shape[-1]):
            return conv2d_forward_gradients(inputs, tf.convert_to_tensor(kernel), padding)
        return tf.nn.conv2d(inputs, kernel, strides=[1, *self.strides, 1], padding=padding,
                            dilations=[1, *self.dilation_rate, 1])

    def convolution_op(self, inputs, kernel):
        """Keras' Conv2D.call convolves through this: one tf.nn.conv2d (of the grouped kernel
        in GroupedConv2D's "native"; its "split" computes the towers in call())."""
        return self._conv(inputs, kernel)


@keras.saving.register_keras_serializable(package="alexnet_tf")
class GroupedConv2D(Conv2D):
    """A `keras.layers.Conv2D` with `groups`, computed as the paper's towers instead of Keras'
    XLA path.

    Weights have the same shape and meaning as `keras.layers.Conv2D(groups=...)`:
    kernel `[kh, kw, in_channels // groups, filters]`; output channels `[g * filters // groups,
    (g + 1) * filters // groups)` see only input channels of group `g` (paper §3.5, Figure 2).

    Args:
        filters, kernel_size, strides, padding, groups, ...: as for `keras.layers.Conv2D`
            (channels_last only).
        implementation: "split" (the default) runs each group as a whole ungrouped layer (conv,
            bias, activation) and concatenates: the original two-GPU towers, on TensorFlow's
            ordinary kernels everywhere. "native" passes the grouped kernel to one
            `tf.nn.conv2d`; only TensorFlow's oneDNN and GPU kernels run that once Grappler
            fuses it with its bias and ReLU (tensorflow#53631), so it refuses to build on a CPU
            without oneDNN. BENCHMARKS.md compares the two.

    Example:
        >>> conv = GroupedConv2D(256, 5, padding="same", groups=2, name="conv2")
        >>> conv(tf.zeros([1, 27, 27, 96])).shape
        TensorShape([1, 27, 27, 256])
    """

    def __init__(self, *args, implementation="split", **kwargs):
        super().__init__(*args, **kwargs)
        if implementation not in GROUPED_CONV_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {GROUPED_CONV_IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        if self.data_format != "channels_last":
            raise ValueError("GroupedConv2D supports data_format='channels_last' only")
        self.implementation = implementation

    def build(self, input_shape):
        if (self.implementation == "native" and self.groups > 1 and not onednn_enabled()
                and not tf.config.list_physical_devices("GPU")):
            raise ValueError(
                f"{self.name}: implementation='native' needs TensorFlow's oneDNN CPU kernels "
                "(TF_ENABLE_ONEDNN_OPTS=1) or a GPU: the plain CPU kernel rejects fused grouped "
                "convolutions (tensorflow#53631); use implementation='split'")
        super().build(input_shape)

    def call(self, inputs):
        if self.groups == 1 or self.implementation == "native":
            return super().call(inputs)
        # Each tower is a whole ungrouped layer (conv, bias, activation) and the towers meet only
        # at the concat, as on the paper's two GPUs. Grappler fuses each tower's conv + bias +
        # ReLU into an ungrouped _FusedConv2D, which every CPU kernel supports.
        kernel = tf.cast(self.kernel, self.compute_dtype)
        biases = (tf.split(tf.cast(self.bias, self.compute_dtype), self.groups)
                  if self.use_bias else [None] * self.groups)
        outputs = []
        for x, k, b in zip(tf.split(inputs, self.groups, axis=-1),
                           tf.split(kernel, self.groups, axis=-1), biases):
            y = self._conv(x, k)
            if b is not None:
                y = tf.nn.bias_add(y, b)
            if self.activation is not None:
                y = self.activation(y)
            outputs.append(y)
        return tf.concat(outputs, axis=-1)

    def get_config(self):
        config = super().get_config()
        config["implementation"] = self.implementation
        return config
