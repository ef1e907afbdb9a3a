"""Every export format beside the SavedModel: size on disk, Fashion-MNIST accuracy, batch-1 latency.

    pip install -e '.[export]'
    python benchmarks/formats.py --workdir=runs/fashion_mnist --out=/tmp/formats
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/formats.py --workdir=runs/fashion_mnist \
        --out=/tmp/formats     # the same exports (kept in --out), TensorFlow's other kernels

Models: the run of --workdir (the README's main command: Fashion-MNIST, the cifar variant), and
seeded paper and one_weird_trick models (size and speed do not depend on training; their int8
files are calibrated on the evaluation views of photographs). Each is exported once per format:
the SavedModel (export.py's default), LiteRT float32, dynamic-range and int8 (float32 input and
output), ONNX and OpenVINO IR. For each it prints:

- the size of the version directory;
- for the run: accuracy on the 10,000 Fashion-MNIST test images and top-1 agreement with the
  SavedModel's `predict_images` (which computes as the run trained: in bfloat16 where
  --mixed_precision chose it, while the other formats compute in float32);
- batch-1 latency, median and 99th percentile, each in its own runtime with every core: the
  SavedModel as TF Serving loads it (`predict_images` on a decoded image: 28 x 28 for the run,
  256 x 256 for the ImageNet models, so its row includes the centre crop and resize), the others
  on one evaluation view. LiteRT runs with its default XNNPACK delegate. OpenVINO computes in
  float32 (INFERENCE_PRECISION_HINT).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_string("workdir", "runs/fashion_mnist", "A finished Fashion-MNIST run.")
flags.DEFINE_string("out", None, "Where the exports go (reused when present).", required=True)
flags.DEFINE_list("variants", ["paper", "one_weird_trick"], "Seeded ImageNet models.")
flags.DEFINE_float("seconds", 3.0, "Timed seconds per model and format.")
FLAGS = flags.FLAGS

EXPORTS = (("saved_model", "none"), ("litert", "none"), ("litert", "dynamic"),
           ("litert", "int8"), ("onnx", "none"), ("openvino", "none"))
PHOTO_SIDE = 256


def export_all(model, class_names, preprocess, root, calibration):
    """{(format, quantize): version directory} of every format, exported unless present."""
    from alexnet_tf import formats, serving

    versions = {}
    for fmt, quantize in EXPORTS:
        base = os.path.join(root, f"{fmt}_{quantize}")
        version = os.path.join(base, "1")
        if not os.path.isdir(version):
            if fmt == "saved_model":
                serving.export_saved_model(model, base, class_names, preprocess, version=1)
            else:
                formats.export(model, base, class_names, preprocess, fmt, quantize=quantize,
                               calibration=calibration, version=1)
        versions[fmt, quantize] = version
    return versions


def runner(version, fmt):
    """call(batch) -> probabilities, for the file of `fmt` in `version`, in its runtime."""
    from alexnet_tf import flag_facts

    if fmt == "saved_model":
        session = common.serving_session(version, "predict_images")
        return lambda images: session(images)["probabilities"]
    path = os.path.join(version, flag_facts.MODEL_FILES[fmt])
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        signature = Interpreter(path, num_threads=os.cpu_count()).get_signature_runner()
        return lambda views: signature(images=views)["probabilities"]
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda views: session.run(["probabilities"], {"images": views})[0]
    import openvino

    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda views: compiled(views)["probabilities"]


def size_mb(version):
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(version) for name in names) / 1e6


def latency(call, batch):
    times = common.latencies(lambda: call(batch), warmup_steps=5, seconds=FLAGS.seconds)
    return 1000 * common.median(times), 1000 * common.percentile(times, 99)


def fashion_mnist_rows(root):
    import numpy as np

    from alexnet_tf import formats, preprocessing, serving, sources
    from alexnet_tf.rundir import RunDir

    model, class_names, preprocess = serving.load_run(FLAGS.workdir, "best")
    calibration = formats.calibration_images(FLAGS.workdir, preprocess)
    versions = export_all(model, class_names, preprocess, os.path.join(root, "fashion_mnist"),
                          calibration)
    images, labels = (sources.read_idx(os.path.join(sources.IDX_DIRS["fashion_mnist"], name))
                      for name in sources.IDX_FILES["test"])
    pixels = images[..., None].astype(np.float32)
    views = preprocessing.eval_images(pixels, preprocess).numpy()
    precision = RunDir(FLAGS.workdir).train_config().mixed_precision
    print(f"\nFashion-MNIST run {FLAGS.workdir} (--mixed_precision={precision}), "
          f"{len(labels)} test images")
    print(f"{'format':<22}{'MB':>8}{'accuracy':>10}{'agrees':>9}{'p50 ms':>9}{'p99 ms':>9}")
    reference = None
    for (fmt, quantize), version in versions.items():
        call = runner(version, fmt)
        inputs = pixels if fmt == "saved_model" else views
        probabilities = np.concatenate([call(inputs[i:i + 500])
                                        for i in range(0, len(inputs), 500)])
        predicted = probabilities.argmax(-1)
        reference = predicted if reference is None else reference
        p50, p99 = latency(call, inputs[:1])
        print(f"{fmt + ' ' + quantize:<22}{size_mb(version):>8.2f}"
              f"{(predicted == labels).mean():>10.4f}{(predicted == reference).mean():>9.4f}"
              f"{p50:>9.2f}{p99:>9.2f}", flush=True)


def imagenet_rows(root, variant):
    import keras
    import numpy as np
    import tensorflow as tf

    import alexnet_tf
    from alexnet_tf import preprocessing
    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    keras.utils.set_random_seed(0)
    model = alexnet_tf.AlexNet(variant=variant)
    size = DEFAULT_IMAGE_SIZE[variant]
    preprocess = preprocessing.PreprocessConfig(image_size=size,
                                            resize_size=preprocessing.resize_size_for(size))
    photos = np.stack([tf.io.decode_jpeg(jpeg).numpy()
                       for jpeg in common.request_images(32, PHOTO_SIDE)]).astype(np.float32)
    views = preprocessing.eval_images(photos, preprocess).numpy()
    versions = export_all(model, [f"class{i}" for i in range(1000)], preprocess,
                          os.path.join(root, variant), views)
    print(f"\n{variant} (seeded; int8 calibrated on {len(views)} photographs)")
    print(f"{'format':<22}{'MB':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for (fmt, quantize), version in versions.items():
        call = runner(version, fmt)
        p50, p99 = latency(call, photos[:1] if fmt == "saved_model" else views[:1])
        print(f"{fmt + ' ' + quantize:<22}{size_mb(version):>8.1f}{p50:>9.2f}{p99:>9.2f}",
              flush=True)


def main(argv):
    del argv
    from importlib import metadata

    from alexnet_tf import keras_compat

    print(f"{common.cpu_model()}, {os.cpu_count()} cores; TensorFlow's oneDNN kernels "
          f"{'on' if keras_compat.onednn_enabled() else 'off'}; {common.versions()}, "
          f"ai-edge-litert {metadata.version('ai-edge-litert')}")
    fashion_mnist_rows(FLAGS.out)
    for variant in FLAGS.variants:
        imagenet_rows(FLAGS.out, variant)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
