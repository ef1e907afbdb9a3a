"""Time of a convolution's two training gradients: TensorFlow's backprop kernels against forward
convolutions (`layers.conv2d_forward_gradients`), on the stride-1 convolutions of the
Fashion-MNIST model (batch 128) and of the paper model (batch 32, one tower of conv2/conv4).

Each row: milliseconds of the input gradient and of the kernel gradient, best of five rounds
of ten calls, both ways, and how far the forward-convolution values are from TensorFlow's. Run
it once per oneDNN setting; `devices.conv_gradients` takes the forward convolutions where they
are faster.

    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/conv_gradients.py
    TF_ENABLE_ONEDNN_OPTS=1 python benchmarks/conv_gradients.py
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
from alexnet_tf.keras_compat import onednn_enabled  # noqa: E402
from alexnet_tf.layers import conv2d_forward_gradients  # noqa: E402

# name: (batch, side, in channels, out channels, kernel), SAME padding.
SHAPES = {
    "fashion conv1": (128, 28, 1, 64, 5),
    "fashion conv2": (128, 14, 64, 64, 5),
    "paper conv2 tower": (32, 27, 48, 128, 5),
    "paper conv3": (32, 13, 256, 384, 3),
    "paper conv4 tower": (32, 13, 192, 192, 3),
}


def gradient_fns(x, w):
    """(input gradient, kernel gradient) functions of dy, each way."""
    strides, shape = [1, 1, 1, 1], tf.shape(x)

    def forward(dy):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = conv2d_forward_gradients(x, w, "SAME")
        return tape.gradient(y, [x, w], output_gradients=dy)

    return {
        "tf": (tf.function(lambda dy: tf.raw_ops.Conv2DBackpropInput(
                   input_sizes=shape, filter=w, out_backprop=dy, strides=strides,
                   padding="SAME")),
               tf.function(lambda dy: tf.raw_ops.Conv2DBackpropFilter(
                   input=x, filter_sizes=tf.shape(w), out_backprop=dy, strides=strides,
                   padding="SAME"))),
        # Each gradient alone: the tape's other output is pruned from the traced graph.
        "forward": (tf.function(lambda dy: forward(dy)[0]),
                    tf.function(lambda dy: forward(dy)[1])),
    }


def best_ms(fn, dy, rounds=5, calls=10):
    fn(dy).numpy()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(dy)
        out.numpy()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1000 * best


def main():
    print(f"{common.cpu_model()}; {common.versions()}; oneDNN "
          f"{'on' if onednn_enabled() else 'off'}")
    print("| convolution | input gradient ms (TF / forward) | kernel gradient ms (TF / forward) "
          "| max difference |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, (batch, side, cin, cout, k) in SHAPES.items():
        x = tf.constant(rng.normal(size=(batch, side, side, cin)), tf.float32)
        w = tf.constant(rng.normal(size=(k, k, cin, cout)) * 0.05, tf.float32)
        dy = tf.constant(rng.normal(size=(batch, side, side, cout)), tf.float32)
        fns = gradient_fns(x, w)
        diff = max(float(tf.reduce_max(tf.abs(a(dy) - b(dy)) / (1 + tf.abs(a(dy)))))
                   for a, b in zip(fns["tf"], fns["forward"]))
        dx = [best_ms(fns[way][0], dy) for way in ("tf", "forward")]
        dw = [best_ms(fns[way][1], dy) for way in ("tf", "forward")]
        print(f"| {name} {batch}×{side}×{side}×{cin}→{cout}, {k}×{k} | {dx[0]:.1f} / {dx[1]:.1f} "
              f"| {dw[0]:.1f} / {dw[1]:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
