"""Local response normalisation (Krizhevsky et al. 2012, §3.3) as a Keras layer."""

import keras
import tensorflow as tf

# (depth_radius, bias, alpha, beta) for tf.nn.local_response_normalization, which computes
#   b[..., c] = a[..., c] / (bias + alpha * sum_{c' = c - r}^{c + r} a[..., c']**2) ** beta
LRN_PRESETS = {
    # Paper §3.3 as printed: k=2, n=5 (radius 2), alpha=1e-4, beta=0.75.
    "paper": (2, 2.0, 1e-4, 0.75),
    # Caffe / cuda-convnet divide alpha by n=5 and Caffe uses k=1; BVLC weights expect this.
    "caffe": (2, 1.0, 2e-5, 0.75),
    # The classic TensorFlow CIFAR-10 tutorial model (tensorflow/models cifar10.py, norm1/norm2).
    "tf_cifar10": (4, 1.0, 0.001 / 9.0, 0.75),
}


@keras.saving.register_keras_serializable(package="alexnet_tf")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel local response normalisation, computed by `tf.nn.local_response_normalization`.

    Under a mixed-precision policy the normalisation is computed in float32 (the sum of squares
    overflows float16 for activations above ~256) and the result is returned in the compute dtype.

    Args:
        depth_radius: half-width of the channel window (the paper's n = 2 * depth_radius + 1).
        bias: the paper's k.
        alpha: the paper's alpha (not divided by n; see the "caffe" preset for that convention).
        beta: the paper's beta.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:
        >>> lrn = LocalResponseNormalization.from_preset("paper", name="lrn1")
        >>> lrn(tf.ones([1, 4, 4, 8])).shape
        TensorShape([1, 4, 4, 8])
    """

    def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
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

    def call(self, inputs):
        outputs = tf.nn.local_response_normalization(
            tf.cast(inputs, tf.float32),
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
            depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )
        return config
