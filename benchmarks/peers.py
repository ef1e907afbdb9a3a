"""The served export beside the runtimes a CPU user would pick instead: same network, same weights.

    pip install -e '.[bench]'   # OpenVINO, ONNX Runtime, tf2onnx (PyTorch: the test extra's)
    python benchmarks/peers.py                  # paper and one_weird_trick, batch 1 and 32
    python benchmarks/peers.py --smoke          # one short round: checks that every engine runs

For each variant, one process exports a seeded model (export.py's SavedModel), saves its weights
for PyTorch and converts its `predict_images` signature for OpenVINO and for ONNX Runtime. Then
each engine runs in a process of its own (TensorFlow and PyTorch cannot share one), started once
and asked in turn, so that the rounds interleave and a slow minute of the machine hits them all:

    tf:serving_default   the export as TF Serving loads it (the C++ SavedModel loader behind a
    tf:predict_images    v1 Session, tag "serve", no XLA): JPEG bytes in, or float pixels in
                         [0, 255]; with TF_ENABLE_ONEDNN_OPTS=0 and =1, one process each
    tf:decode            decoding the request's JPEGs alone (tf.io.decode_jpeg), for the target
    openvino             OpenVINO's conversion of predict_images (openvino.convert_model)
    onnxruntime          ONNX Runtime on tf2onnx's conversion of predict_images
    torch, torch.compile the same network (tests/torch_reference.py), model only, inference_mode

The TensorFlow, OpenVINO and ONNX Runtime rows include predict_images' preprocessing (resize and
centre crop of each 256x256 image); the PyTorch rows take the crops (a PyTorch server would
preprocess outside the model). Every engine's probabilities on one batch are checked against
the export's before any timing. Prints img/s, p50/p99 latency (ms) and each ratio to the fastest
peer (OpenVINO, ONNX Runtime, PyTorch) per variant and batch size.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

CHECK_BATCH = 8

flags.DEFINE_list("variants", ["paper", "one_weird_trick"], "Variants to export and compare.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the table gives the median round.")
flags.DEFINE_float("seconds", 2.0, "Timed seconds per engine, batch size and round (>= 5 calls).")
flags.DEFINE_list("engines", None, "Only these engines (default: all).")
flags.DEFINE_bool("smoke", False, "One round of 0.2 s windows at batch 1 and 2: checks it runs.")
flags.DEFINE_string("_role", None, "Internal: prepare | an engine name (a child process).")
flags.DEFINE_string("_workdir", None, "Internal: the child's working directory.")
flags.DEFINE_string("_variant", None, "Internal: the child's variant.")
flags.DEFINE_integer("_count", CHECK_BATCH, "Internal: request images to prepare.")
FLAGS = flags.FLAGS

ENGINES = ("tf:serving_default@onednn0", "tf:predict_images@onednn0", "tf:decode@onednn0",
           "tf:serving_default@onednn1", "tf:predict_images@onednn1", "tf:decode@onednn1",
           "openvino", "onnxruntime", "torch", "torch.compile")
PEERS = ("openvino", "onnxruntime", "torch", "torch.compile")
SIDE = 256  # every request image is SIDE x SIDE, as resized photographs usually are


# --------------------------------------------------------------------------------------------
# The prepare child: export, weights, conversions, request images


def torch_weights(model):
    """The Keras model's weights in PyTorch's layout, in the order of the reference network's
    Conv2d and Linear modules (conv1..fc8)."""
    import numpy as np

    arrays = []
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        kernel, bias = model.get_layer(name).get_weights()
        if kernel.ndim == 4:  # [kh, kw, in/groups, out] -> [out, in/groups, kh, kw]
            kernel = kernel.transpose(3, 2, 0, 1)
        elif name == "fc6":  # rows in Keras' (H, W, C) flatten order -> PyTorch's (C, H, W)
            side = int(round((kernel.shape[0] // 256) ** 0.5))
            kernel = kernel.reshape(side, side, 256, -1).transpose(3, 2, 0, 1).reshape(
                kernel.shape[1], -1)
        else:
            kernel = kernel.T
        arrays += [np.ascontiguousarray(kernel), bias]
    return arrays


def prepare(workdir, variant, count):
    import numpy as np
    import openvino
    import tensorflow as tf

    jpegs = common.request_images(count, SIDE)
    for i, data in enumerate(jpegs):
        with open(os.path.join(workdir, f"{i}.jpg"), "wb") as f:
            f.write(data)
    model, _, export, images, views = common.seeded_export(os.path.join(workdir, "export"),
                                                           variant, jpegs)
    np.save(os.path.join(workdir, "images.npy"), images)
    np.save(os.path.join(workdir, "views.npy"), views)
    np.savez(os.path.join(workdir, "torch_weights.npz"), *torch_weights(model))

    loaded = tf.saved_model.load(export)  # kept alive while OpenVINO converts its signature
    # float32 weights, as every other engine has them (save_model's default halves them).
    openvino.save_model(openvino.convert_model(loaded.signatures["predict_images"]),
                        os.path.join(workdir, "openvino.xml"), compress_to_fp16=False)
    subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", export,
                    "--signature_def", "predict_images", "--output",
                    os.path.join(workdir, "model.onnx")], check=True, capture_output=True)


# --------------------------------------------------------------------------------------------
# The engine children: each loads its engine once, then answers requests on stdin


def tf_engine(workdir, signature):
    """call(batch) for the export loaded as tensorflow_model_server loads it."""
    import numpy as np
    import tensorflow as tf

    export = os.path.join(workdir, "export", "1")
    images = np.load(os.path.join(workdir, "images.npy")).astype(np.float32)
    jpegs = [open(os.path.join(workdir, f"{i}.jpg"), "rb").read() for i in range(len(images))]
    if signature == "decode":
        decode = tf.function(
            lambda b: tf.map_fn(tf.io.decode_jpeg, b, fn_output_signature=tf.uint8))
        return lambda n: {"pixels": decode(tf.constant(jpegs[:n])).numpy()}
    run = common.serving_session(export, signature)
    data = jpegs if signature == "serving_default" else images
    return lambda n: run(data[:n])


def openvino_engine(workdir):
    import numpy as np
    import openvino

    images = np.load(os.path.join(workdir, "images.npy")).astype(np.float32)
    # float32 arithmetic: on a CPU with bfloat16 units OpenVINO would otherwise compute in bf16.
    compiled = openvino.Core().compile_model(os.path.join(workdir, "openvino.xml"), "CPU",
                                             {"INFERENCE_PRECISION_HINT": "f32"})
    index = next(i for i, out in enumerate(compiled.outputs) if "probabilities" in out.names)

    def call(n):
        return {"probabilities": compiled(images[:n])[index]}

    return call


def onnxruntime_engine(workdir):
    import numpy as np
    import onnxruntime

    images = np.load(os.path.join(workdir, "images.npy")).astype(np.float32)
    session = onnxruntime.InferenceSession(os.path.join(workdir, "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    names = [out.name for out in session.get_outputs()]
    output = next(name for name in names if "probabilities" in name)
    return lambda n: {"probabilities": session.run([output], {feed: images[:n]})[0]}


def torch_engine(workdir, variant, compiled):
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    model = common.torch_alexnet(variant).eval()
    weights = np.load(os.path.join(workdir, "torch_weights.npz"))
    modules = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        for i, module in enumerate(modules):
            module.weight.copy_(torch.from_numpy(weights[f"arr_{2 * i}"]))
            module.bias.copy_(torch.from_numpy(weights[f"arr_{2 * i + 1}"]))
    views = torch.from_numpy(np.load(os.path.join(workdir, "views.npy")).transpose(0, 3, 1, 2)
                             .copy())
    forward = torch.compile(model) if compiled else model

    def call(n):
        with torch.inference_mode():
            return {"probabilities": torch.softmax(forward(views[:n]), -1).numpy()}

    return call


def engine_call(name, workdir, variant):
    if name.startswith("tf:"):
        return tf_engine(workdir, name[3:].split("@")[0])
    if name == "openvino":
        return openvino_engine(workdir)
    if name == "onnxruntime":
        return onnxruntime_engine(workdir)
    return torch_engine(workdir, variant, compiled=name == "torch.compile")


def serve_requests(name, workdir, variant):
    """The child's loop: {"check": n} -> the probabilities of the first n images; {"batch": n,
    "seconds": s} -> per-call seconds of at least 5 calls filling s, after 2 untimed calls."""
    import numpy as np

    call = engine_call(name, workdir, variant)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "check" in request:
            out = call(request["check"])
            reply = {"probabilities": None if "probabilities" not in out else
                     np.asarray(out["probabilities"], np.float64).tolist()}
        else:
            n = request["batch"]
            reply = {"times": common.latencies(lambda: call(n), 2, request["seconds"])}
        print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: no framework imported here


def child_command(role, workdir, variant, *extra):
    return [sys.executable, os.path.abspath(__file__), f"--_role={role}", f"--_workdir={workdir}",
            f"--_variant={variant}", *extra]


def child_log(workdir, name):
    """The child's stderr, kept in its workdir and quoted when it fails."""
    return open(os.path.join(workdir, name.replace(":", "_").replace("@", "_") + ".log"), "w")


def log_tail(log):
    log.flush()
    with open(log.name) as f:
        lines = [line.strip() for line in f if line.strip()]
    return " / ".join(lines[-3:])


def child_env(name):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if "@onednn" in name:
        env["TF_ENABLE_ONEDNN_OPTS"] = name[-1]
    return env


class Engine:
    """An engine's child process, asked one JSON request at a time."""

    def __init__(self, name, workdir, variant):
        self.name = name
        self.log = child_log(workdir, name)
        self.process = subprocess.Popen(child_command(name, workdir, variant), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=child_env(name))
        self.ask(None)

    def ask(self, request):
        if request is not None:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name}: the engine's process ended "
                                   f"(exit {self.process.wait()}): {log_tail(self.log)}")
            if line.startswith("{"):
                return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def compare(variant, workdir, batch_sizes, rounds, seconds, names):
    import numpy as np

    started = time.perf_counter()
    with child_log(workdir, "prepare") as log:
        count = f"--_count={max(max(batch_sizes), CHECK_BATCH)}"
        if subprocess.run(child_command("prepare", workdir, variant, count), env=child_env(""),
                          stderr=log).returncode:
            raise RuntimeError(f"{variant}: preparing the export failed: {log_tail(log)}")
    engines = [Engine(name, workdir, variant) for name in names]
    print(f"{variant}: exported, converted and {len(engines)} engines loaded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    answers = {e.name: e.ask({"check": CHECK_BATCH})["probabilities"] for e in engines}
    # The reference: the export's predict_images.
    first = sorted((n for n in answers if answers[n] is not None), key=lambda n: "predict" not in n)
    reference = np.asarray(answers[first[0]])
    for engine in engines:
        if answers[engine.name] is None:
            continue
        probabilities = np.asarray(answers[engine.name])
        diff = np.abs(probabilities - reference).max()
        same = (probabilities.argmax(-1) == reference.argmax(-1)).mean()
        print(f"  {engine.name}: max |p - p_predict_images| = {diff:.1e}, same top-1 {same:.0%} "
              f"(top-1 p {probabilities.max(-1).min():.2f}-{probabilities.max(-1).max():.2f})",
              flush=True)
    times = {(e.name, b): [] for e in engines for b in batch_sizes}
    rates = {(e.name, b): [] for e in engines for b in batch_sizes}
    for _ in range(rounds):
        for batch in batch_sizes:
            for engine in engines:
                t = engine.ask({"batch": batch, "seconds": seconds})["times"]
                times[engine.name, batch] += t
                rates[engine.name, batch].append(batch * len(t) / sum(t))
    for engine in engines:
        engine.close()
    return {key: (common.median(rates[key]), 1000 * common.percentile(times[key], 50),
                  1000 * common.percentile(times[key], 99)) for key in times}


def table(variant, results, batch_sizes, names):
    print(f"\n{variant}: img/s (p50 ms, p99 ms) and ratio to the fastest peer")
    print("| engine | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |")
    print("|---|" + "---|" * len(batch_sizes))
    fastest = {b: max((results[p, b][0] for p in PEERS if (p, b) in results), default=None)
               for b in batch_sizes}
    for name in names:
        cells = []
        for b in batch_sizes:
            rate, p50, p99 = results[name, b]
            ratio = f", {rate / fastest[b]:.2f}x" if fastest[b] and "decode" not in name else ""
            cells.append(f"{rate:.1f} ({p50:.1f}, {p99:.1f}){ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for setting in ("0", "1"):
        served, pixels, decode = (f"tf:{s}@onednn{setting}" for s in
                                  ("serving_default", "predict_images", "decode"))
        if all((n, batch_sizes[0]) in results for n in (served, pixels, decode)):
            parts = []
            for b in batch_sizes:
                bound = results[pixels, b][1] + results[decode, b][1]
                parts.append(f"batch {b}: {results[served, b][1] / bound:.2f}")
            print(f"oneDNN {setting}: serving_default p50 / (predict_images p50 + decode p50): "
                  + ", ".join(parts))


def main(argv):
    del argv
    if FLAGS._role == "prepare":
        return prepare(FLAGS._workdir, FLAGS._variant, FLAGS._count)
    if FLAGS._role:
        return serve_requests(FLAGS._role, FLAGS._workdir, FLAGS._variant)
    batch_sizes = [1, 2] if FLAGS.smoke else [int(b) for b in FLAGS.batch_sizes]
    rounds, seconds = (1, 0.2) if FLAGS.smoke else (FLAGS.rounds, FLAGS.seconds)
    names = [n for n in ENGINES if not FLAGS.engines or n in FLAGS.engines]
    print(f"{common.cpu_model()}, {os.cpu_count()} cores; {common.versions()}; "
          f"{rounds} rounds of {seconds} s", flush=True)
    for variant in FLAGS.variants:
        with tempfile.TemporaryDirectory() as workdir:
            results = compare(variant, workdir, batch_sizes, rounds, seconds, names)
        table(variant, results, batch_sizes, names)


if __name__ == "__main__":
    app.run(main)
