"""Training throughput of AlexNet through plain `compile`/`fit` on synthetic data.

For each variant x batch size x jit_compile setting, prints images/s, achieved GFLOP/s and the
percentage of this machine's matrix-multiply peak (measured first, with TensorFlow's own fp32
matmul), and, with --torch, the same network trained by PyTorch in the same run. Synthetic data,
so only the model is measured.

    python benchmarks/train_step.py --variants=paper --batch_sizes=32 --torch --repeats=5
    python benchmarks/train_step.py --variants=paper,single_tower,one_weird_trick,cifar \\
        --batch_sizes=32,128 --jit=both
    python benchmarks/train_step.py --mixed_precision=bfloat16 --jit=true   # on a GPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_list("variants", ["paper"], "AlexNet variants.")
flags.DEFINE_list("batch_sizes", ["32"], "Global batch sizes.")
flags.DEFINE_enum("jit", "false", ["false", "true", "both"], "jit_compile setting(s).")
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps (tracing, oneDNN primitive creation); "
                     "at least 1.")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("repeats", 1, "Rounds per row, each measuring alexnet_tf then PyTorch; "
                     "the row reports medians (this machine's speed varies by ~10% between runs).")
flags.DEFINE_enum(
    "grouped_conv", "native", ["native", "split", "keras"],
    "Grouped convolution: GroupedConv2D 'native' or 'split', or Keras' own Conv2D(groups=2).",
)
flags.DEFINE_string("lrn", "paper", "LRN preset, or 'none'.")
flags.DEFINE_enum("lrn_implementation", "auto", ["auto", "fused", "tf"],
                  "LocalResponseNormalization implementation (see alexnet_tf.lrn).")
flags.DEFINE_enum("dense_implementation", "auto", ["auto", "eigen", "tf"],
                  "fc6-fc8 matmul (see alexnet_tf.layers.Dense).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "float16", "bfloat16"], "Keras dtype policy.")
flags.DEFINE_bool("torch", False, "Also train the same network in PyTorch (CPU) in this run "
                  "(under torch.autocast bfloat16 when --mixed_precision=bfloat16).")
flags.DEFINE_integer("threads", 0, "Intra-op threads for PyTorch (0: one per core).")
flags.DEFINE_bool("mirrored", False, "Train under MirroredStrategy over all visible GPUs.")
FLAGS = flags.FLAGS


def build(variant, grouped_conv, lrn, lrn_implementation, dense_implementation="auto"):
    import keras
    import alexnet_tf
    from alexnet_tf.layers import GroupedConv2D

    lrn = None if lrn == "none" else lrn
    if grouped_conv != "keras":
        return alexnet_tf.AlexNet(variant=variant, lrn=lrn, grouped_conv_implementation=grouped_conv,
                                  lrn_implementation=lrn_implementation,
                                  dense_implementation=dense_implementation)
    # Naive reference: the same model with every GroupedConv2D replaced by Keras' Conv2D(groups).
    model = alexnet_tf.AlexNet(variant=variant, lrn=lrn, lrn_implementation=lrn_implementation,
                               dense_implementation=dense_implementation)

    def clone(layer):
        if isinstance(layer, GroupedConv2D):
            config = layer.get_config()
            config.pop("implementation")
            return keras.layers.Conv2D.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def train_rate(variant, batch_size, jit_compile, strategy):
    """(images/s, training FLOPs per image) of compile/fit on synthetic data."""
    import keras
    import tensorflow as tf

    with strategy.scope():
        model = build(variant, FLAGS.grouped_conv, FLAGS.lrn, FLAGS.lrn_implementation,
                      FLAGS.dense_implementation)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
    shape = (batch_size, *model.input_shape[1:])
    images = tf.random.uniform(shape, -1.0, 1.0)
    labels = tf.random.uniform((batch_size,), 0, model.output_shape[-1], tf.int32)
    # No autotuning thread: in TensorFlow 2.21 fit()'s iterator teardown can wait whole seconds
    # for it to wake up (see data.make_dataset); the steps are timed inside fit() regardless,
    # from the end of the last warm-up step to the end of the last step.
    options = tf.data.Options()
    options.autotune.enabled = False
    data = (tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
            .with_options(options))
    clock = common.step_clock(FLAGS.warmup_steps)
    model.fit(data, steps_per_epoch=FLAGS.warmup_steps + FLAGS.steps, epochs=1, verbose=0,
              callbacks=[clock])
    elapsed = clock.end - clock.start
    return FLAGS.steps * batch_size / elapsed, common.training_flops(model)


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    if FLAGS.mixed_precision != "none":
        keras.config.set_dtype_policy(f"mixed_{FLAGS.mixed_precision}")
    gpus = tf.config.list_physical_devices("GPU")
    strategy = (tf.distribute.MirroredStrategy() if FLAGS.mirrored
                else tf.distribute.get_strategy())
    device = f"{len(gpus)} GPU(s)" if gpus else f"CPU, {os.cpu_count()} cores"
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {device}; "
          f"policy {keras.config.dtype_policy().name}; grouped_conv={FLAGS.grouped_conv} "
          f"lrn={FLAGS.lrn} ({FLAGS.lrn_implementation}) dense={FLAGS.dense_implementation}",
          flush=True)
    peak = None
    if not gpus:
        # The peak of the dtype the convolutions and matmuls compute in.
        dtype = {"none": "float32", "float16": "float16", "bfloat16": "bfloat16"}[
            FLAGS.mixed_precision]
        peak = common.matmul_peak_gflops(dtype=dtype)
        print(f"matmul peak (tf.matmul 4096x4096 {dtype}): {peak:.0f} GFLOP/s", flush=True)

    jits = {"false": [False], "true": [True], "both": [False, True]}[FLAGS.jit]
    print("| variant | batch | jit | img/s | ms/step | GFLOP/s | % of matmul peak |"
          + (" PyTorch img/s | ratio | PyTorch without LRN img/s | ratio |" if FLAGS.torch
             else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|---|---|" if FLAGS.torch else ""),
          flush=True)
    for variant in FLAGS.variants:
        for batch_size in (int(b) for b in FLAGS.batch_sizes):
            for jit in jits:
                print(row(variant, batch_size, jit, strategy, peak), flush=True)


def row(variant, batch_size, jit, strategy, peak):
    """One table row: medians over FLAGS.repeats rounds, each round measuring alexnet_tf and
    then PyTorch (with and without its LRN), so that both see the same phases of the machine."""
    import numpy as np

    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    torch_lrn = [True, False] if FLAGS.torch and variant != "cifar" else []
    if FLAGS.lrn == "none" or variant == "one_weird_trick":  # no LRN to leave out
        torch_lrn = torch_lrn[:1]
    threads = FLAGS.threads or os.cpu_count()
    rates, torch_rates = [], {lrn: [] for lrn in torch_lrn}
    for _ in range(FLAGS.repeats):
        rate, flops = train_rate(variant, batch_size, jit, strategy)
        rates.append(rate)
        for lrn in torch_lrn:
            torch_rates[lrn].append(common.torch_train_rate(
                variant, batch_size, DEFAULT_IMAGE_SIZE[variant], FLAGS.steps, FLAGS.warmup_steps,
                threads, bfloat16=FLAGS.mixed_precision == "bfloat16",
                lrn=lrn and FLAGS.lrn != "none"))
    rate = float(np.median(rates))
    gflops = rate * flops / 1e9
    text = (f"| {variant} | {batch_size} | {jit} | {rate:.1f} | {batch_size / rate * 1000:.0f} | "
            f"{gflops:.0f} | {f'{100 * gflops / peak:.0f}%' if peak else '-'} |")
    if FLAGS.torch:
        for lrn in (True, False):
            if lrn not in torch_rates:
                text += " - | - |"
                continue
            torch_rate = float(np.median(torch_rates[lrn]))
            # The ratio of each round's pair, as a median and a range.
            ratios = np.asarray(rates) / np.asarray(torch_rates[lrn])
            spread = (f" ({ratios.min():.2f}-{ratios.max():.2f})" if len(ratios) > 1 else "")
            text += f" {torch_rate:.1f} | {np.median(ratios):.2f}x{spread} |"
    return text


if __name__ == "__main__":
    app.run(main)
