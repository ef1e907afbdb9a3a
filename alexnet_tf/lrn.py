"""Local response normalisation (Krizhevsky et al. 2012, §3.3) as a Keras layer."""

import keras
import tensorflow as tf

from alexnet_tf import devices
from alexnet_tf.flag_facts import LRN_PRESETS
from alexnet_tf.layers import using_standard_ops

# LRN_PRESETS: (depth_radius, bias, alpha, beta) for tf.nn.local_response_normalization, which
# computes b[..., c] = a[..., c] / (bias + alpha * sum_{c' = c - r}^{c + r} a[..., c']**2) ** beta

LRN_IMPLEMENTATIONS = ("auto", "fused", "tf")


def _neg_power(d, beta):
    """d ** -beta; for the usual beta = 0.75 as rsqrt(d) * rsqrt(sqrt(d)), cheaper than pow."""
    if beta == 0.75:
        return tf.math.rsqrt(d) * tf.math.rsqrt(tf.sqrt(d))
    if beta == 0.5:
        return tf.math.rsqrt(d)
    return tf.exp(-beta * tf.math.log(d))


def _window_sum(v, radius):
    """sum_{c' = c - r}^{c + r} v[..., c'] with zeros beyond the edges, as padded slices (XLA
    fuses them with the surrounding element-wise ops into one pass over memory)."""
    channels = v.shape[-1]
    padded = tf.pad(v, [[0, 0]] * (v.shape.rank - 1) + [[radius, radius]])
    total = padded[..., :channels]
    for i in range(1, 2 * radius + 1):
        total = total + padded[..., i : i + channels]
    return total


def _normaliser(x, depth_radius, bias, alpha):
    """d = bias + alpha * (window sum of x**2), the denominator of LRN's y = x * d**-beta."""
    return bias + alpha * _window_sum(tf.square(x), depth_radius)


def fused_lrn_forward(depth_radius, bias, alpha, beta):
    """The forward half of `fused_lrn` alone (inference): one XLA-fused pass, faster than
    `tf.nn.local_response_normalization`'s CPU kernel (benchmarks/lrn.py, BENCHMARKS.md)."""

    @tf.function(jit_compile=True)
    def forward(x):
        return x * _neg_power(_normaliser(x, depth_radius, bias, alpha), beta)

    return forward


def fused_lrn(depth_radius, bias, alpha, beta):
    """LRN with a hand-written gradient, both XLA-fused; same values as
    `tf.nn.local_response_normalization` (to float32 rounding).

    TensorFlow's CPU `LRNGrad` kernel is a slow scalar loop: in the paper model the two LRN
    layers' forward + backward took a large share of a training step (BENCHMARKS.md). With
    d = bias + alpha * S, S = window sum of x**2 and y = x * d**-beta, the gradient is
        dx = g * d**-beta - 2 * alpha * beta * x * window_sum(g * y / d),
    two fused passes with the forward's d**-beta and y / d kept.

    Returns:
        A function of a float32 tensor [..., C] usable under `tf.GradientTape`.
    """

    @tf.function(jit_compile=True)
    def forward(x):
        d = _normaliser(x, depth_radius, bias, alpha)
        scale = _neg_power(d, beta)
        y = x * scale
        return y, scale, y / d

    @tf.function(jit_compile=True)
    def backward(g, x, scale, y_over_d):
        return g * scale - (2.0 * alpha * beta) * x * _window_sum(g * y_over_d, depth_radius)

    @tf.custom_gradient
    def lrn(x):
        y, scale, y_over_d = forward(x)
        return y, lambda g: backward(g, x, scale, y_over_d)

    return lrn


@keras.saving.register_keras_serializable(package="alexnet_tf")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel local response normalisation (paper §3.3), with the values of
    `tf.nn.local_response_normalization`; on a CPU computed by an XLA-fused form of the same
    formula, see `implementation`.

    Under a mixed-precision policy the normalisation is computed in float32 (the sum of squares
    overflows float16 for activations above ~256) and the result is returned in the compute dtype.

    Args:
        depth_radius: half-width of the channel window (the paper's n = 2 * depth_radius + 1).
        bias: the paper's k.
        alpha: the paper's alpha (not divided by n; see the "caffe" preset for that convention).
        beta: the paper's beta.
        implementation: "tf" (`tf.nn.local_response_normalization` and its gradient), "fused"
            (the same values, XLA-fused: `fused_lrn` in training and `fused_lrn_forward` in
            inference, both faster than TensorFlow's CPU kernels: BENCHMARKS.md) or
            "auto" ("fused" when no GPU is visible, else "tf", whose GPU kernels are cuDNN's).
            Inside `standard_ops()` (which `serving.export_saved_model` uses) every
            implementation computes `tf.nn.local_response_normalization`, so exported
            SavedModels hold only standard ops.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:
        >>> lrn = LocalResponseNormalization.from_preset("paper", name="lrn1")
        >>> lrn(tf.ones([1, 4, 4, 8])).shape
        TensorShape([1, 4, 4, 8])
    """

    def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, implementation="auto",
                 **kwargs):
        super().__init__(**kwargs)
        if implementation not in LRN_IMPLEMENTATIONS:
            raise ValueError(f"unknown LRN implementation {implementation!r}; "
                             f"choose one of {LRN_IMPLEMENTATIONS}")
        self.implementation = implementation
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Builds the layer from a name in `LRN_PRESETS` ("paper", "caffe", "tf_cifar10")."""
        if preset not in LRN_PRESETS:
            raise ValueError(f"unknown LRN preset {preset!r}; choose one of {sorted(LRN_PRESETS)}")
        depth_radius, bias, alpha, beta = LRN_PRESETS[preset]
        return cls(depth_radius=depth_radius, bias=bias, alpha=alpha, beta=beta, **kwargs)

    def build(self, input_shape):
        implementation = self.implementation
        if implementation == "auto":
            implementation = devices.lrn_implementation(devices.DeviceFacts.of_this_machine())
        self._fused = self._fused_forward = None
        if implementation == "fused":
            params = self.depth_radius, self.bias, self.alpha, self.beta
            self._fused = fused_lrn(*params)
            self._fused_forward = fused_lrn_forward(*params)

    def call(self, inputs, training=None):
        inputs = tf.cast(inputs, tf.float32)
        if self._fused is not None and not using_standard_ops():
            outputs = self._fused(inputs) if training else self._fused_forward(inputs)
        else:
            outputs = tf.nn.local_response_normalization(
                inputs,
                depth_radius=self.depth_radius,
                bias=self.bias,
                alpha=self.alpha,
                beta=self.beta,
            )
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta,
            implementation=self.implementation,
        )
        return config
