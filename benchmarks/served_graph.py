"""Candidate forms of the served graph, standard ops only, timed as TF Serving runs them.

    python benchmarks/served_graph.py --variant=paper --batch_sizes=1,32

Exports the same seeded model as export.py does (`today`), and as SavedModels whose
`predict_images` differs in one way each:

    explicit        today's graph rebuilt layer by layer here (checks that the rebuild costs
                    nothing, so that the rows below differ only by their change)
    per_image_preprocessing  `tf.map_fn` over `preprocessing.eval_image`, one image at a time,
                    instead of `preprocessing.eval_images` on the whole batch
    lrn_matmul      LRN's window sum of squares as one matmul with a banded C x C matrix and
                    d ** -0.75 as rsqrt(d) * rsqrt(sqrt(d)), instead of TensorFlow's LRN kernel
    fc_bfloat16     fc6 and fc7 stored and multiplied in bfloat16 (half the weight bytes a
                    batch-1 request reads), float32 elsewhere

Each is loaded by the C++ SavedModel loader behind a v1 Session (tag "serve", as
tensorflow_model_server loads it), in one process per oneDNN setting, and timed in interleaved
rounds. Prints img/s and p50 latency per candidate and batch size, its ratio to `today`, and
its largest probability difference from `today` on photographs.
"""

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_string("variant", "paper", "Variant to export.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the table gives the median round.")
flags.DEFINE_float("seconds", 2.0, "Timed seconds per candidate, batch size and round.")
flags.DEFINE_string("_role", None, "Internal: prepare | time (a child process).")
flags.DEFINE_string("_workdir", None, "Internal: the child's working directory.")
FLAGS = flags.FLAGS

CANDIDATES = ("today", "explicit", "per_image_preprocessing", "lrn_matmul", "fc_bfloat16")


def banded_lrn(layer):
    """LRN with tf.nn.local_response_normalization's values from MatMul, Rsqrt and Mul."""
    import numpy as np
    import tensorflow as tf

    def lrn(x):
        channels = x.shape[-1]
        index = np.arange(channels)
        band = tf.constant(np.abs(index[:, None] - index[None, :]) <= layer.depth_radius,
                           tf.float32)
        shape = tf.shape(x)
        window = tf.reshape(tf.matmul(tf.reshape(tf.square(x), [-1, channels]), band), shape)
        d = layer.bias + layer.alpha * window
        assert layer.beta == 0.75
        return x * (tf.math.rsqrt(d) * tf.math.rsqrt(tf.sqrt(d)))

    return lrn


def bfloat16_dense(layer):
    import tensorflow as tf

    kernel = tf.Variable(tf.cast(layer.kernel, tf.bfloat16), trainable=False)
    bias = tf.Variable(layer.bias, trainable=False)

    def dense(x):
        y = tf.cast(tf.matmul(tf.cast(x, tf.bfloat16), kernel), tf.float32) + bias
        return tf.nn.relu(y) if layer.activation.__name__ == "relu" else y

    dense.variables = (kernel, bias)
    return dense


def candidate_module(model, config, candidate):
    """A tf.Module whose `predict_images` is today's graph with one change."""
    import tensorflow as tf

    from alexnet_tf import preprocessing

    module = tf.Module()
    replaced = {}
    for layer in model.layers:
        if candidate == "lrn_matmul" and type(layer).__name__ == "LocalResponseNormalization":
            replaced[layer.name] = banded_lrn(layer)
        if candidate == "fc_bfloat16" and layer.name in ("fc6", "fc7"):
            replaced[layer.name] = bfloat16_dense(layer)
    module.extra = [v for f in replaced.values() for v in getattr(f, "variables", ())]
    # The tf.Variables behind the Keras ones, which the function captures.
    module.model_variables = [w.value for layer in model.layers for w in layer.weights
                              if layer.name not in replaced]
    view_spec = tf.TensorSpec([config.image_size, config.image_size, config.channels], tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, config.channels], tf.float32,
                                                name="images")])
    def predict_images(images):
        if candidate == "per_image_preprocessing":
            x = tf.map_fn(lambda i: preprocessing.eval_image(i, config), images,
                          fn_output_signature=view_spec)
        else:
            x = preprocessing.eval_images(images, config)
        for layer in model.layers[1:]:
            if type(layer).__name__ == "Dropout":
                continue
            x = replaced[layer.name](x) if layer.name in replaced else layer(x, training=False)
        return {"probabilities": tf.nn.softmax(tf.cast(x, tf.float32))}

    module.predict_images = predict_images
    return module


def prepare(workdir, variant):
    import numpy as np
    import tensorflow as tf

    from alexnet_tf.layers import standard_ops

    jpegs = common.request_images(max(int(b) for b in FLAGS.batch_sizes), 256)
    model, config, export, images, _ = common.seeded_export(os.path.join(workdir, "today"),
                                                            variant, jpegs)
    np.save(os.path.join(workdir, "images.npy"), images.astype(np.float32))
    os.rename(export, os.path.join(workdir, "today.saved"))
    with standard_ops():
        for candidate in CANDIDATES[1:]:
            module = candidate_module(model, config, candidate)
            tf.saved_model.save(module, os.path.join(workdir, f"{candidate}.saved"),
                                signatures={"predict_images": module.predict_images})


def time_candidates(workdir, batch_sizes, rounds, seconds):
    """Child: prints one JSON line, {candidate: {"probabilities": of 8 images, "rates": {batch:
    img/s per round}, "times": {batch: seconds per call}}, "fc_alone_ms": fc_matmuls_ms()}."""
    import numpy as np

    images = np.load(os.path.join(workdir, "images.npy"))
    runs = {c: common.serving_session(os.path.join(workdir, f"{c}.saved"), "predict_images")
            for c in CANDIDATES}
    calls = {c: (lambda run: lambda n: run(images[:n])["probabilities"])(runs[c])
             for c in CANDIDATES}
    result = {c: {"probabilities": calls[c](8).tolist(), "rates": {}, "times": {}}
              for c in CANDIDATES}
    for _ in range(rounds):
        for batch in batch_sizes:
            for candidate in CANDIDATES:
                call = calls[candidate]
                times = common.latencies(lambda: call(batch), 2, seconds)
                entry = result[candidate]
                entry["rates"].setdefault(str(batch), []).append(batch * len(times) / sum(times))
                entry["times"].setdefault(str(batch), []).extend(times)
    result["fc_alone_ms"] = fc_matmuls_ms()
    print(json.dumps(result), flush=True)


def fc_matmuls_ms(seconds=2.0):
    """Median ms of fc6, fc7 and fc8's matmuls alone at batch 1 (MatMul + BiasAdd + Relu on
    random float32 weights of the paper's shapes): the part of a request that reads the 234 MB."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shapes = ((9216, 4096), (4096, 4096), (4096, 1000))
    weights = [(tf.Variable(rng.standard_normal(s, np.float32)), tf.Variable(np.zeros(s[1],
                np.float32))) for s in shapes]

    @tf.function
    def fc(x):
        for kernel, bias in weights:
            x = tf.nn.relu(tf.matmul(x, kernel) + bias)
        return x

    x = tf.constant(rng.standard_normal((1, 9216), np.float32))
    return 1000 * common.median(common.latencies(lambda: fc(x).numpy(), 10, seconds))


def main(argv):
    del argv
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    if FLAGS._role == "prepare":
        return prepare(FLAGS._workdir, FLAGS.variant)
    if FLAGS._role == "time":
        return time_candidates(FLAGS._workdir, batch_sizes, FLAGS.rounds, FLAGS.seconds)
    import numpy as np

    print(f"{common.cpu_model()}, {os.cpu_count()} cores; {common.versions()}; {FLAGS.variant}; "
          f"{FLAGS.rounds} rounds of {FLAGS.seconds} s", flush=True)
    me = [sys.executable, os.path.abspath(__file__), f"--variant={FLAGS.variant}",
          f"--batch_sizes={','.join(FLAGS.batch_sizes)}", f"--rounds={FLAGS.rounds}",
          f"--seconds={FLAGS.seconds}"]
    with tempfile.TemporaryDirectory() as workdir:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        subprocess.run(me + ["--_role=prepare", f"--_workdir={workdir}"], check=True, env=env,
                       stderr=subprocess.DEVNULL)
        for setting in ("0", "1"):
            out = subprocess.run(me + ["--_role=time", f"--_workdir={workdir}"], check=True,
                                 env=dict(env, TF_ENABLE_ONEDNN_OPTS=setting), text=True,
                                 capture_output=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            today = np.asarray(result["today"]["probabilities"])
            print(f"\noneDNN {setting}: img/s (p50 ms), ratio to today; max |p - p_today|")
            print("| candidate | " + " | ".join(f"batch {b}" for b in batch_sizes)
                  + " | max abs diff |")
            print("|---|" + "---|" * (len(batch_sizes) + 1))
            for candidate in CANDIDATES:
                entry, cells = result[candidate], []
                for b in batch_sizes:
                    rate = common.median(entry["rates"][str(b)])
                    base = common.median(result["today"]["rates"][str(b)])
                    p50 = 1000 * common.percentile(entry["times"][str(b)], 50)
                    cells.append(f"{rate:.1f} ({p50:.1f}), {rate / base:.2f}x")
                diff = np.abs(np.asarray(entry["probabilities"]) - today).max()
                print(f"| {candidate} | " + " | ".join(cells) + f" | {diff:.1e} |", flush=True)
            print(f"fc6-fc8's matmuls alone, batch 1: {result['fc_alone_ms']:.1f} ms", flush=True)


if __name__ == "__main__":
    app.run(main)
