"""Layers that keep AlexNet on TensorFlow's fast kernels: grouped convolution and dense layers.

Keras 3's `Conv2D(groups>1)` on the TensorFlow backend wraps the convolution in an XLA-compiled
function on CPU, which measured about 8x slower (forward+backward) than a plain convolution of
the same size on a 2-core machine. `tf.nn.conv2d` accepts grouped filters directly (the input
has `groups` times the filter's input channels) and runs on oneDNN / cuDNN without XLA.

On CPU, oneDNN's float32 GEMM is slow for the fully connected layers' short, wide products at
small batches (fc6 at batch 32: 45 ms forward where reading its weights takes 10 ms); Eigen's
takes 30 ms. `Dense` routes them there.
"""

import contextlib
import threading

import keras
import tensorflow as tf

IMPLEMENTATIONS = ("native", "split")
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
    (w @ dy^T)^T: `SparseMatMul` with `transpose_b` on the large operand measured 6x slower.
    """
    y = tf.raw_ops.SparseMatMul(a=x, b=w)

    def grad(dy):
        dx = tf.transpose(tf.raw_ops.SparseMatMul(a=w, b=dy, transpose_b=True))
        dw = tf.raw_ops.SparseMatMul(a=x, b=dy, transpose_a=True)
        return dx, dw

    return y, grad


@keras.saving.register_keras_serializable(package="alexnet_tf")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense` whose float32 matmul runs on Eigen's CPU GEMM instead of oneDNN's in
    training.

    Same weights, values and gradients (to float32 rounding). Measured on the paper model
    (batch 32, 2-core CPU, `compile`/`fit`): +3-6% training throughput (BENCHMARKS.md). Not in
    inference (training=False): there it measured no faster at batch 32 and ~25% slower at
    batch 1.

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
            implementation = "tf" if tf.config.list_physical_devices("GPU") else "eigen"
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
