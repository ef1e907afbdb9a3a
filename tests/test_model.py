"""The AlexNet family: sizes, shapes, grouping, gradients, initialisation, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import alexnet_tf
from alexnet_tf import AlexNet, GroupedConv2D
from alexnet_tf.layers import onednn_enabled
from tests.helpers import require


@pytest.mark.parametrize(
    "variant, expected",
    [
        # Sum of the layer sizes printed in the paper / BVLC deploy.prototxt / torchvision.
        ("paper", 60_965_224),
        ("single_tower", 62_378_344),
        ("one_weird_trick", 61_100_840),
        # TF CIFAR-10 tutorial: 5*5*3*64+64 + 5*5*64*64+64 + 8*8*64*384+384 + 384*192+192 + 192*10+10
        ("cifar", 4864 + 102_464 + 1_573_248 + 73_920 + 1_930),
        # The seed write-up's small AlexNet, as it prints it (its PyTorch module is in
        # test_small_variant_matches_the_seed_pytorch_model).
        ("small", 576_778),
    ],
)
def test_parameter_counts(variant, expected):
    num_classes = 10 if variant in ("cifar", "small") else 1000
    assert AlexNet(num_classes, variant=variant).count_params() == expected


@pytest.mark.parametrize(
    "variant, input_shape, num_classes",
    [
        ("paper", (227, 227, 3), 1000),
        ("paper", (227, 227, 1), 10),
        ("paper", (255, 255, 4), 7),
        ("single_tower", (227, 227, 3), 2),
        ("one_weird_trick", (224, 224, 3), 1000),
        ("one_weird_trick", (256, 200, 1), 5),
        ("cifar", (32, 32, 3), 10),
        ("cifar", (28, 28, 1), 10),
        ("small", (32, 32, 3), 10),
        ("small", (28, 28, 1), 10),
        ("small", (19, 19, 3), 4),  # the smallest input it takes
    ],
)
def test_output_shapes(variant, input_shape, num_classes):
    model = AlexNet(num_classes, variant=variant, input_shape=input_shape)
    out = model(np.zeros((2, *input_shape), np.float32))
    assert out.shape == (2, num_classes)


def test_one_weird_trick_pools_adaptively_to_6x6():
    # torchvision's AdaptiveAvgPool2d((6, 6)) keeps fc6 at 9216 inputs for any image size.
    small = AlexNet(variant="one_weird_trick")
    large = AlexNet(variant="one_weird_trick", input_shape=(320, 288, 3))
    assert small.get_layer("fc6").kernel.shape == large.get_layer("fc6").kernel.shape == (9216, 4096)


def test_include_top_false_is_the_feature_extractor():
    model = AlexNet(variant="paper", input_shape=(None, None, 3), include_top=False)
    assert model(np.zeros((1, 227, 227, 3), np.float32)).shape == (1, 6, 6, 256)
    assert model(np.zeros((1, 259, 259, 3), np.float32)).shape == (1, 7, 7, 256)
    assert "fc8" not in [layer.name for layer in model.layers]


def test_layer_names_for_weight_mapping():
    names = {layer.name for layer in AlexNet(variant="paper").layers}
    expected = {f"conv{i}" for i in range(1, 6)} | {f"fc{i}" for i in (6, 7, 8)}
    expected |= {"lrn1", "lrn2", "pool1", "pool2", "pool5"}
    assert expected <= names
    assert isinstance(AlexNet(variant="paper").get_layer("conv2"), GroupedConv2D)


@pytest.mark.onednn
@pytest.mark.parametrize("implementation", [
    "split",
    pytest.param("native", marks=pytest.mark.skipif(
        not (onednn_enabled() or tf.config.list_physical_devices("GPU")),
        reason="'native' builds only with oneDNN or a GPU (test_portability covers both)")),
])
def test_grouped_layers_are_really_grouped(implementation):
    model = AlexNet(variant="paper", grouped_conv_implementation=implementation, init="keras")
    for name, in_channels in (("conv2", 96), ("conv4", 384), ("conv5", 384)):
        conv = model.get_layer(name)
        x = tf.random.normal([1, 13, 13, in_channels])
        perturbed = tf.concat([x[..., : in_channels // 2] + 1.0, x[..., in_channels // 2 :]], -1)
        # Compare pre-activation outputs (ReLU could hide a change): the layer without it.
        linear = GroupedConv2D.from_config({**conv.get_config(), "activation": None})
        linear.build(x.shape)
        linear.set_weights(conv.get_weights())
        y0, y1 = linear(x), linear(perturbed)
        half = conv.filters // 2
        np.testing.assert_array_equal(y0[..., half:], y1[..., half:])
        assert np.abs(y0[..., :half] - y1[..., :half]).min() > 0


@pytest.mark.onednn
def test_grouped_conv_matches_two_independent_convolutions():
    # Independent reference: numpy convolutions of each half of the input with its half of the
    # kernel (stride 1, SAME), plus bias, through the ReLU.
    conv = GroupedConv2D(8, 3, padding="same", groups=2, activation="relu",
                         bias_initializer="random_normal")
    x = tf.random.normal([2, 7, 7, 6])
    y = conv(x).numpy()
    k, b, xs = conv.kernel.numpy(), conv.bias.numpy(), np.pad(x.numpy(), [(0, 0), (1, 1), (1, 1), (0, 0)])
    expected = np.zeros_like(y)
    for g in range(2):
        for i in range(7):
            for j in range(7):
                patch = xs[:, i : i + 3, j : j + 3, 3 * g : 3 * g + 3]
                expected[..., i, j, 4 * g : 4 * g + 4] = np.einsum(
                    "nhwc,hwcf->nf", patch, k[..., 4 * g : 4 * g + 4])
    np.testing.assert_allclose(y, np.maximum(expected + b, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.onednn
@pytest.mark.parametrize("variant", alexnet_tf.VARIANTS)
def test_every_trainable_weight_gets_a_gradient(variant):
    model = AlexNet(10, variant=variant, init="keras")
    shape = model.input_shape[1:]
    x = tf.random.uniform([2, *shape], -1, 1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    for weight, grad in zip(model.trainable_weights, grads):
        assert grad is not None, weight.path
        assert float(tf.reduce_max(tf.abs(grad))) > 0, weight.path


def test_paper_init_statistics():
    model = AlexNet(variant="paper", init="paper")
    assert np.std(model.get_layer("conv1").kernel.numpy()) == pytest.approx(0.01, rel=0.03)
    assert np.mean(model.get_layer("fc6").kernel.numpy()) == pytest.approx(0.0, abs=1e-4)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        np.testing.assert_array_equal(model.get_layer(name).bias.numpy(), 1.0)
    for name in ("conv1", "conv3", "fc8"):
        np.testing.assert_array_equal(model.get_layer(name).bias.numpy(), 0.0)


def test_caffe_init_statistics():
    model = AlexNet(variant="paper", init="caffe")
    assert np.std(model.get_layer("fc6").kernel.numpy()) == pytest.approx(0.005, rel=0.03)
    assert np.std(model.get_layer("conv3").kernel.numpy()) == pytest.approx(0.01, rel=0.03)
    np.testing.assert_allclose(model.get_layer("conv2").bias.numpy(), 0.1)
    np.testing.assert_array_equal(model.get_layer("conv1").bias.numpy(), 0.0)


@pytest.mark.slow
def test_keras_save_load_round_trip_without_custom_objects(tmp_path):
    model = AlexNet(10, variant="paper", lrn="caffe", init="keras")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 227, 227, 3)).astype(np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored(x), model(x))
    assert restored.get_layer("conv2").get_config() == model.get_layer("conv2").get_config()
    assert restored.get_layer("lrn1").alpha == 2e-5


@pytest.mark.onednn
def test_mixed_precision_forward_pass():
    keras.config.set_dtype_policy("mixed_float16")
    model = AlexNet(10, variant="cifar", input_shape=(28, 28, 1), init="keras")
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("lrn1").compute_dtype == "float16"
    out = model(np.random.default_rng(0).uniform(0, 255, (2, 28, 28, 1)).astype(np.float32))
    assert out.dtype == "float32"
    assert np.all(np.isfinite(out.numpy()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="vgg"), "unknown AlexNet variant 'vgg'"),
        (dict(init="xavier"), "unknown init 'xavier'"),
        (dict(lrn="big"), "unknown LRN preset 'big'"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(input_shape=(None, None, 3)), "include_top=True needs a fixed input"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlexNet(**kwargs)


def ops_in(fn, *specs):
    """Op types of the graph `fn` traces for `specs`, nested functions included."""
    graph = tf.function(fn).get_concrete_function(*specs).graph.as_graph_def()
    nested = [node for function in graph.library.function for node in function.node_def]
    return {node.op for node in list(graph.node) + nested}


@pytest.mark.onednn
def test_eigen_dense_matches_numpy_forward_and_gradients():
    from alexnet_tf.layers import Dense

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 300)).astype(np.float32)
    upstream = rng.normal(size=(5, 70)).astype(np.float32)
    layer = Dense(70, activation="relu", implementation="eigen", bias_initializer="random_normal")
    layer.build((None, 300))
    w, b = (v.numpy().astype(np.float64) for v in (layer.kernel, layer.bias))
    # Independent reference: y = relu(x w + b); with g the upstream gradient masked by y > 0,
    # dL/dx = g w^T, dL/dw = x^T g, dL/db = sum_batch g.
    pre = x.astype(np.float64) @ w + b
    g = upstream * (pre > 0)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
    dx, dw, db = tape.gradient(y, [xt, layer.kernel, layer.bias], output_gradients=upstream)
    np.testing.assert_allclose(y.numpy(), np.maximum(pre, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.numpy(), g @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy(), x.T.astype(np.float64) @ g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db.numpy(), g.sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.onednn
def test_dense_trains_on_eigen_on_cpu_and_uses_standard_matmul_otherwise():
    from alexnet_tf.layers import Dense, standard_ops

    spec = tf.TensorSpec([None, 64], tf.float32)
    auto = Dense(8)  # no GPU on the test machines: "auto" is "eigen"
    auto.build((None, 64))
    assert "SparseMatMul" in ops_in(lambda x: auto(x, training=True), spec)
    inference = ops_in(lambda x: auto(x, training=False), spec)
    assert "SparseMatMul" not in inference and "MatMul" in inference
    with standard_ops():
        standard = ops_in(lambda x: auto(x, training=True), spec)
    assert "SparseMatMul" not in standard and "MatMul" in standard
    plain = Dense(8, implementation="tf")
    plain.build((None, 64))
    assert "SparseMatMul" not in ops_in(lambda x: plain(x, training=True), spec)


def numpy_conv_and_gradients(x, w, upstream, padding):
    """Stride-1 convolution (cross-correlation, as TensorFlow's) of x [B, H, W, Ci] with w [kh,
    kw, Ci, Co], and the gradients of sum(y * upstream) by x and w, as loops over the kernel's
    taps in float64: y[o] = sum_a xpad[o + a] w[a], dx = sum over taps of upstream moved back,
    dw[a] = sum_o xpad[o + a] upstream[o]. SAME pads (k - 1) // 2 before and the rest after."""
    kh, kw = w.shape[:2]
    top, left = ((kh - 1) // 2, (kw - 1) // 2) if padding == "SAME" else (0, 0)
    bottom, right = (kh - 1 - top, kw - 1 - left) if padding == "SAME" else (0, 0)
    xpad = np.pad(x.astype(np.float64), [(0, 0), (top, bottom), (left, right), (0, 0)])
    oh, ow = xpad.shape[1] - kh + 1, xpad.shape[2] - kw + 1
    y = np.zeros(upstream.shape)
    dxpad, dw = np.zeros(xpad.shape), np.zeros(w.shape)
    for i in range(kh):
        for j in range(kw):
            window = xpad[:, i:i + oh, j:j + ow]
            y += window @ w[i, j]
            dxpad[:, i:i + oh, j:j + ow] += upstream @ w[i, j].T
            dw[i, j] = np.einsum("bhwc,bhwo->co", window, upstream)
    dx = dxpad[:, top:top + x.shape[1], left:left + x.shape[2]]
    return y, dx, dw


@pytest.mark.parametrize("kernel, padding", [(5, "SAME"), (4, "SAME"), (3, "VALID"), (1, "SAME")])
def test_forward_gradient_convolution_matches_numpy(kernel, padding):
    from alexnet_tf.layers import conv2d_forward_gradients

    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32)
    out_shape = (2, 7, 6, 4) if padding == "SAME" else (2, 7 - kernel + 1, 6 - kernel + 1, 4)
    upstream = rng.normal(size=out_shape).astype(np.float32)
    y_ref, dx_ref, dw_ref = numpy_conv_and_gradients(x, w, upstream, padding)
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = conv2d_forward_gradients(xt, wt, padding)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=upstream)
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy(), dw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("onednn", [False, True])
def test_convolutions_train_on_forward_gradients_only_without_onednn(onednn, monkeypatch):
    from alexnet_tf import devices
    from alexnet_tf.layers import Conv2D, standard_ops

    facts = devices.DeviceFacts(cpu_flags=frozenset({"avx2"}), onednn=onednn)
    monkeypatch.setattr(devices.DeviceFacts, "of_this_machine",
                        classmethod(lambda cls, *a: facts))
    spec = tf.TensorSpec([None, 8, 8, 3], tf.float32)
    layer, strided = Conv2D(4, 3, padding="same"), Conv2D(4, 3, strides=2)
    layer.build(spec.shape)
    strided.build(spec.shape)

    def gradient_ops(conv):
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(conv(x))
            return tape.gradient(loss, conv.kernel)
        return ops_in(step, spec)

    backprop = {"Conv2DBackpropFilter", "Conv2DBackpropInput"}
    assert bool(backprop & gradient_ops(layer)) is onednn
    assert backprop & gradient_ops(strided)  # stride 2: TensorFlow's kernels
    with standard_ops():
        assert backprop & gradient_ops(layer)


def test_dense_keeps_keras_path_under_mixed_precision():
    from alexnet_tf.layers import Dense

    layer = Dense(8, implementation="eigen", dtype="mixed_bfloat16")
    layer.build((None, 64))
    ops = ops_in(lambda x: layer(x, training=True), tf.TensorSpec([None, 64], tf.float32))
    assert "SparseMatMul" not in ops


def test_dense_config_round_trips_and_rejects_unknown_implementation():
    from alexnet_tf.layers import Dense

    layer = Dense(8, implementation="tf", name="fc")
    clone = Dense.from_config(layer.get_config())
    assert clone.implementation == "tf" and clone.units == 8
    with pytest.raises(ValueError, match="implementation must be one of"):
        Dense(8, implementation="mkl")


@pytest.mark.onednn
def test_small_variant_matches_the_seed_pytorch_model():
    torch = require("torch")
    from tests import torch_reference

    model = AlexNet(10, variant="small", init="keras")
    assert not [layer for layer in model.layers
                if isinstance(layer, (alexnet_tf.LocalResponseNormalization, keras.layers.Dropout))]
    reference = torch_reference.SeedSmallAlexNet()
    kernel = {name: model.get_layer(name).get_weights() for name in
              ("conv1", "conv2", "fc6", "fc7", "fc8")}
    # Keras flattens pool2's 4x4x64 output as (height, width, channel), PyTorch as (channel,
    # height, width): fc1's input rows are reordered accordingly.
    fc6 = kernel["fc6"][0].reshape(4, 4, 64, 384).transpose(3, 2, 0, 1).reshape(384, 1024)
    with torch.no_grad():
        for module, name in ((reference.conv1[0], "conv1"), (reference.conv2[0], "conv2")):
            module.weight.copy_(torch.from_numpy(kernel[name][0].transpose(3, 2, 0, 1)))
            module.bias.copy_(torch.from_numpy(kernel[name][1]))
        reference.fc1[0].weight.copy_(torch.from_numpy(fc6))
        for module, name in ((reference.fc1[0], "fc6"), (reference.fc2[0], "fc7"),
                             (reference.fc3, "fc8")):
            if name != "fc6":
                module.weight.copy_(torch.from_numpy(kernel[name][0].T))
            module.bias.copy_(torch.from_numpy(kernel[name][1]))
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = torch_reference.logits(reference, images)
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
