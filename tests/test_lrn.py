"""LocalResponseNormalization against the paper's formula computed independently in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import LocalResponseNormalization


def lrn_reference(a, n, k, alpha, beta):
    """Paper §3.3: b_c = a_c / (k + alpha * sum_{c'=max(0,c-n/2)}^{min(N-1,c+n/2)} a_c'^2)^beta."""
    channels = a.shape[-1]
    b = np.empty_like(a, dtype=np.float64)
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        sq = np.sum(a[..., lo : hi + 1].astype(np.float64) ** 2, axis=-1)
        b[..., c] = a[..., c] / (k + alpha * sq) ** beta
    return b


@pytest.mark.onednn
@pytest.mark.parametrize(
    "preset, n, k, alpha",
    [("paper", 5, 2.0, 1e-4), ("caffe", 5, 1.0, 2e-5), ("tf_cifar10", 9, 1.0, 0.001 / 9)],
)
@pytest.mark.parametrize("implementation, training", [("tf", False), ("tf", True),
                                                     ("fused", True), ("fused", False)])
def test_matches_paper_formula_including_edge_channels(preset, n, k, alpha, implementation,
                                                         training):
    rng = np.random.default_rng(0)
    # Large activations so the normaliser differs clearly from k^-beta.
    a = rng.normal(0, 30, size=(2, 3, 4, 12)).astype(np.float32)
    layer = LocalResponseNormalization.from_preset(preset, implementation=implementation)
    expected = lrn_reference(a, n, k, alpha, 0.75)
    got = layer(a, training=training).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # First and last channels have truncated windows: check them on their own too.
    np.testing.assert_allclose(got[..., [0, -1]], expected[..., [0, -1]], rtol=1e-5)
    assert not np.allclose(expected, a / k**0.75, rtol=1e-3)


def numeric_gradient(a, weights, n, k, alpha, beta, eps=1e-3):
    """d sum(weights * lrn(a)) / da by central differences of the float64 numpy reference."""
    a = a.astype(np.float64)
    grad = np.zeros_like(a)
    for index in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = np.sum(weights * (lrn_reference(plus, n, k, alpha, beta)
                                        - lrn_reference(minus, n, k, alpha, beta))) / (2 * eps)
    return grad


@pytest.mark.onednn
@pytest.mark.parametrize("implementation", ["fused", "tf"])
@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_gradient_matches_finite_differences(implementation, beta):
    rng = np.random.default_rng(1)
    # Activations large enough that the cross-channel term of the gradient matters.
    a = rng.normal(0, 40, size=(2, 2, 2, 7)).astype(np.float32)
    weights = rng.normal(size=a.shape)
    layer = LocalResponseNormalization(depth_radius=2, bias=2.0, alpha=1e-4, beta=beta,
                                       implementation=implementation)
    x = tf.constant(a)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.constant(weights, tf.float32) * layer(x, training=True))
    got = tape.gradient(loss, x).numpy()
    expected = numeric_gradient(a, weights, 5, 2.0, 1e-4, beta)
    assert np.abs(expected - weights / 2.0**beta).max() > 1e-2  # cross terms are not negligible
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.onednn
def test_fused_training_path_matches_tensorflow_lrn_on_paper_shapes():
    x = tf.random.normal([2, 27, 27, 256], stddev=30.0, seed=3)
    upstream = tf.random.normal(x.shape, seed=4)
    results = {}
    for implementation in ("fused", "tf"):
        layer = LocalResponseNormalization.from_preset("paper", implementation=implementation)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        results[implementation] = (y, tape.gradient(y, x, output_gradients=upstream))
    np.testing.assert_allclose(results["fused"][0], results["tf"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["fused"][1], results["tf"][1], rtol=1e-4, atol=1e-6)


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown LRN implementation"):
        LocalResponseNormalization(implementation="cuda")


@pytest.mark.onednn
def test_same_result_inside_tf_function():
    a = tf.random.normal([2, 5, 5, 16], stddev=20.0)
    layer = LocalResponseNormalization.from_preset("paper")
    np.testing.assert_allclose(tf.function(layer)(a), layer(a), rtol=1e-6)


def test_get_config_round_trips_and_is_registered():
    layer = LocalResponseNormalization(depth_radius=3, bias=1.5, alpha=3e-4, beta=0.6, name="n")
    config = layer.get_config()
    clone = LocalResponseNormalization.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, LocalResponseNormalization)
    assert (restored.depth_radius, restored.bias, restored.alpha, restored.beta) == (3, 1.5, 3e-4, 0.6)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown LRN preset 'nope'"):
        LocalResponseNormalization.from_preset("nope")


@pytest.mark.onednn
@pytest.mark.parametrize("policy, dtype", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_computes_in_float32(policy, dtype):
    keras.config.set_dtype_policy(policy)
    layer = LocalResponseNormalization.from_preset("paper")
    # 400^2 * 5 overflows float16 (max 65504): computing in float16 would give 0 or inf/nan.
    a = np.full((1, 2, 2, 8), 400.0, np.float32)
    out = layer(a)
    assert out.dtype == dtype
    expected = lrn_reference(a, 5, 2.0, 1e-4, 0.75)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, rtol=1e-2)


@pytest.mark.onednn
@pytest.mark.parametrize("implementation", ["tf", "fused"])
def test_float16_lrn_under_xla_matches_the_formula(implementation):
    # TensorFlow's own LRN fails under XLA in float16 (openxla/xla#43450); the layer computes
    # in float32, so a float16 model compiles with XLA and keeps the paper's values, its
    # gradient too (finite, where a float16 sum of squares would overflow).
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = LocalResponseNormalization.from_preset("paper", implementation=implementation)
        a = np.random.default_rng(0).uniform(-400, 400, (2, 3, 3, 16)).astype(np.float16)

        @tf.function(jit_compile=True)
        def forward_and_gradient(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                total = tf.reduce_sum(tf.cast(y, tf.float32))
            return y, tape.gradient(total, x)

        out, gradient = forward_and_gradient(tf.constant(a))
    finally:
        keras.config.set_dtype_policy("float32")
    assert out.dtype == tf.float16
    expected = lrn_reference(a.astype(np.float32), 5, 2.0, 1e-4, 0.75)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, rtol=2e-3, atol=1e-3)
    assert np.all(np.isfinite(tf.cast(gradient, tf.float32).numpy()))
