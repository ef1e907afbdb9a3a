"""Time of LocalResponseNormalization: TensorFlow's kernels against the fused ones.

Times `LocalResponseNormalization(training=True)` forward + backward under `GradientTape`, and
the inference forward (`training=False`), on the activation shapes of the paper model (batch
32) and of the Fashion-MNIST model (batch 128), for each implementation, and prints how far the
fused values and gradients are from TensorFlow's.

    python benchmarks/lrn.py
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from alexnet_tf.lrn import LocalResponseNormalization  # noqa: E402

SHAPES = {
    "paper lrn1 (batch 32)": ("paper", [32, 55, 55, 96]),
    "paper lrn2 (batch 32)": ("paper", [32, 27, 27, 256]),
    "fashion lrn1/lrn2 (batch 128)": ("tf_cifar10", [128, 14, 14, 64]),
}


def forward_backward(layer, x, upstream):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, x, output_gradients=upstream)

    return step


def best_ms(step, x, repeats=10):
    step(x)[-1].numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x)[-1].numpy()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def inference(layer):
    return tf.function(lambda x: (layer(x, training=False),))


def main():
    print("| activation | shape | training: tf.nn.local_response_normalization ms | fused ms | "
          "speed-up | inference: tf ms | fused ms | speed-up | max value diff | "
          "max gradient diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (preset, shape) in SHAPES.items():
        x = tf.random.normal(shape, stddev=30.0, seed=0)
        upstream = tf.random.normal(shape, seed=1)
        results = {}
        for implementation in ("tf", "fused"):
            layer = LocalResponseNormalization.from_preset(preset, implementation=implementation)
            step = forward_backward(layer, x, upstream)
            predict = inference(layer)
            results[implementation] = (best_ms(step, x), best_ms(predict, x), *step(x),
                                       predict(x)[0])
        (t_tf, i_tf, y_tf, g_tf, p_tf) = results["tf"]
        (t_fused, i_fused, y_fused, g_fused, p_fused) = results["fused"]
        value_diff = max(np.abs(y_tf - y_fused).max(), np.abs(p_tf - p_fused).max())
        print(f"| {name} | {'x'.join(map(str, shape))} | {t_tf:.1f} | {t_fused:.1f} | "
              f"{t_tf / t_fused:.1f}x | {i_tf:.1f} | {i_fused:.1f} | {i_tf / i_fused:.1f}x | "
              f"{value_diff:.1e} | {np.abs(g_tf - g_fused).max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
