"""The device-side input stage's share of a training step (preprocessing_layers.InputStage: float
cast, flip, PCA lighting, normalisation of uint8 crops, as train.py runs it inside each step).

Trains the paper variant through compile/fit on synthetic data twice: on float32 batches that
are already model inputs (no stage), and on uint8 batches through the stage
(preprocessing_layers.run_input_stage). Also times the stage alone on one batch. Prints the step
times and the stage's share of a step, by both estimates.

    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/input_stage.py
    TF_ENABLE_ONEDNN_OPTS=1 python benchmarks/input_stage.py --batch_size=128 --steps=10
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_string("variant", "paper", "AlexNet variant.")
flags.DEFINE_integer("batch_size", 128, "Batch size (paper §5: 128).")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps; at least 1.")
flags.DEFINE_integer("steps", 8, "Timed steps.")
flags.DEFINE_integer("repeats", 2, "Rounds, each measuring both set-ups; medians are reported.")
FLAGS = flags.FLAGS


def step_seconds(staged):
    """Seconds per training step, on uint8 batches through the stage or on float32 batches."""
    import keras
    import numpy as np
    import tensorflow as tf

    import alexnet_tf
    from alexnet_tf import preprocessing, preprocessing_layers

    model = alexnet_tf.AlexNet(variant=FLAGS.variant)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    shape = (FLAGS.batch_size, *model.input_shape[1:])
    if staged:
        stage = preprocessing_layers.InputStage(preprocessing.PreprocessConfig())
        preprocessing_layers.run_input_stage(model, stage)
        images = tf.constant(np.random.default_rng(0).integers(0, 256, shape, np.uint8))
    else:
        images = tf.random.uniform(shape, -128.0, 128.0)
    labels = tf.random.uniform((FLAGS.batch_size,), 0, model.output_shape[-1], tf.int32)
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2).with_options(options)
    clock = common.step_clock(FLAGS.warmup_steps)
    model.fit(ds, steps_per_epoch=FLAGS.warmup_steps + FLAGS.steps, epochs=1, verbose=0,
              callbacks=[clock])
    return (clock.end - clock.start) / FLAGS.steps


def stage_seconds():
    """Seconds of the stage alone on one uint8 batch (training=True), best of 20."""
    import numpy as np
    import tensorflow as tf

    from alexnet_tf import preprocessing, preprocessing_layers

    stage = preprocessing_layers.InputStage(preprocessing.PreprocessConfig())
    images = tf.constant(np.random.default_rng(0).integers(
        0, 256, (FLAGS.batch_size, 227, 227, 3), np.uint8))
    run = tf.function(lambda x: tf.reduce_sum(stage(x, training=True)))
    run(images).numpy()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        run(images).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    from alexnet_tf import layers

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores, "
          f"oneDNN {'on' if layers.onednn_enabled() else 'off'}; {FLAGS.variant}, batch "
          f"{FLAGS.batch_size}", flush=True)
    plain, staged, alone = [], [], []
    for _ in range(FLAGS.repeats):
        plain.append(step_seconds(staged=False))
        staged.append(step_seconds(staged=True))
        alone.append(stage_seconds())
        print(f"round: step {1000 * plain[-1]:.0f} ms (float32 inputs), "
              f"{1000 * staged[-1]:.0f} ms (uint8 through the stage); stage alone "
              f"{1000 * alone[-1]:.1f} ms", flush=True)
    plain, staged, alone = (float(np.median(v)) for v in (plain, staged, alone))
    print(f"| step, float32 inputs | step, uint8 + stage | stage alone | stage alone / step "
          f"| (staged - plain) / staged |\n|---|---|---|---|---|\n"
          f"| {1000 * plain:.0f} ms | {1000 * staged:.0f} ms | {1000 * alone:.1f} ms "
          f"| {alone / staged:.1%} | {(staged - plain) / staged:.1%} |")


if __name__ == "__main__":
    app.run(main)
