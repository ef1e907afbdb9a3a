"""Training throughput of AlexNet through plain `compile`/`fit` on synthetic data.

Measures images/s over timed steps after warm-up, so only the model (not the input pipeline)
is measured. Example:
    python benchmarks/train_step.py --variant=paper --batch_size=32 --grouped_conv=native
"""

import time

from absl import app, flags

flags.DEFINE_string("variant", "paper", "AlexNet variant.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps (tracing, oneDNN primitive creation).")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_enum(
    "grouped_conv", "native", ["native", "split", "keras"],
    "Grouped convolution: GroupedConv2D 'native' or 'split', or Keras' own Conv2D(groups=2).",
)
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
FLAGS = flags.FLAGS


def _build(variant, grouped_conv):
    import keras
    import alexnet_tf
    from alexnet_tf.layers import GroupedConv2D

    if grouped_conv != "keras":
        return alexnet_tf.AlexNet(variant=variant, grouped_conv_implementation=grouped_conv)
    # Naive reference: the same model with every GroupedConv2D replaced by Keras' Conv2D(groups).
    model = alexnet_tf.AlexNet(variant=variant)

    def clone(layer):
        if isinstance(layer, GroupedConv2D):
            config = layer.get_config()
            config.pop("implementation")
            return keras.layers.Conv2D.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    model = _build(FLAGS.variant, FLAGS.grouped_conv)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=FLAGS.jit_compile,
    )
    shape = (FLAGS.batch_size, *model.input_shape[1:])
    images = tf.random.uniform(shape, -1.0, 1.0)
    labels = tf.random.uniform((FLAGS.batch_size,), 0, model.output_shape[-1], tf.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    model.fit(data, steps_per_epoch=FLAGS.warmup_steps, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
    elapsed = time.perf_counter() - start
    rate = FLAGS.steps * FLAGS.batch_size / elapsed
    print(
        f"variant={FLAGS.variant} batch={FLAGS.batch_size} grouped_conv={FLAGS.grouped_conv} "
        f"jit={FLAGS.jit_compile} threads={tf.config.threading.get_intra_op_parallelism_threads()}"
        f" : {rate:.1f} img/s ({elapsed / FLAGS.steps * 1000:.0f} ms/step)"
    )


if __name__ == "__main__":
    app.run(main)
