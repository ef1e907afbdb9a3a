"""Shared pieces of the benchmarks: FLOP counts, this machine's matmul peak, PyTorch references.

PyTorch is a reference only (`pip install torch==2.13.0`), never a dependency of alexnet_tf.
"""

import os
import sys
import time

import numpy as np

# The repository root, for tests/torch_reference.py (the benchmarks run as scripts).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def forward_flops(model):
    """Multiply-adds x 2 of one image's forward pass through the conv and dense layers."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "GroupedConv2D"):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in_per_group, _ = layer.kernel.shape
            total += 2 * h * w * kh * kw * c_in_per_group * c_out
        elif kind == "Dense":
            total += 2 * int(np.prod(layer.kernel.shape))
    return total


def training_flops(model):
    """FLOPs of one trained image: forward + gradients w.r.t. inputs and weights (each ~ the
    forward), except conv1's input gradient, which nobody computes."""
    first_conv = next(l for l in model.layers if type(l).__name__ in ("Conv2D", "GroupedConv2D"))
    _, h, w, c_out = first_conv.output.shape
    kh, kw, c_in, _ = first_conv.kernel.shape
    return 3 * forward_flops(model) - 2 * h * w * kh * kw * c_in * c_out


def step_clock(warmup_steps):
    """A Keras callback that records when warm-up ends (`start`) and when the last training step
    ends (`end`)."""
    import keras

    class Clock(keras.callbacks.Callback):
        start = end = None

        def on_train_batch_end(self, batch, logs=None):
            if batch == warmup_steps - 1:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    return Clock()


def last_epoch_rate(workdir):
    """The images/s of a train.py run's last epoch, from its history.csv (EpochReport's rate of
    the epoch's steps)."""
    import csv

    with open(os.path.join(workdir, "history.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["images_per_sec"])


def matmul_peak_gflops(n=4096, repeats=10, dtype="float32"):
    """This machine's fp32 matrix-multiply rate as TensorFlow achieves it (best of `repeats`)."""
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=dtype)
    b = tf.random.uniform((n, n), dtype=dtype)

    @tf.function
    def step(a, b):
        return tf.reduce_sum(tf.matmul(a, b))

    step(a, b).numpy()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def torch_alexnet(variant, num_classes=1000, lrn=True):
    """The same network in PyTorch (NCHW), from tests/torch_reference.py: paper / single_tower
    (LRN as in the paper, k=2) or one_weird_trick (torchvision's layout). `lrn=False` leaves
    PyTorch's LocalResponseNorm out: the speed PyTorch would reach with an LRN that cost nothing
    (a bound, not the same network)."""
    from tests import torch_reference

    if variant == "one_weird_trick":
        return torch_reference.TorchvisionAlexNet(num_classes)
    if variant in ("paper", "single_tower"):
        return torch_reference.alexnet(variant, num_classes, lrn="paper" if lrn else None)
    raise ValueError(f"no PyTorch reference for variant {variant!r}")


def torch_threads(threads):
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def torch_train_rate(variant, batch_size, image_size, steps, warmup_steps, threads,
                     bfloat16=False, lrn=True):
    """Images/s of PyTorch SGD-momentum training of the same network on synthetic data
    (with `bfloat16`, under `torch.autocast("cpu", torch.bfloat16)`, PyTorch's mixed precision)."""
    import contextlib

    import torch

    torch_threads(threads)
    torch.manual_seed(0)
    model = torch_alexnet(variant, lrn=lrn).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1
    labels = torch.randint(0, 1000, (batch_size,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bfloat16
                    else contextlib.nullcontext())
        with autocast:
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup_steps):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def torch_inference_latencies(variant, batch_size, image_size, steps, warmup_steps, threads):
    """Per-batch latencies (s) of PyTorch inference (eval mode, no_grad) on synthetic data."""
    import torch

    torch_threads(threads)
    model = torch_alexnet(variant).eval()
    images = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1
    latencies = []
    with torch.inference_mode():
        for i in range(warmup_steps + steps):
            start = time.perf_counter()
            model(images)
            if i >= warmup_steps:
                latencies.append(time.perf_counter() - start)
    return latencies


# Colour photographs bundled with scikit-image (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry")


def source_photos():
    """scikit-image's photographs (PHOTOS) as uint8 RGB arrays or, where scikit-image is not
    installed, matplotlib's one sample photograph (Grace Hopper, 600 x 512)."""
    try:
        import skimage.data
    except ImportError:
        import matplotlib.cbook
        import numpy as np
        from PIL import Image

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return [np.asarray(Image.open(f).convert("RGB"))]
    return [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]


def request_images(count, side):
    """`count` photographs (scikit-image's or matplotlib's) cut and resized to side x side, as
    the JPEG bytes (quality 90) a client would send."""
    import io

    import numpy as np
    from PIL import Image

    photos = source_photos()
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        cut = int(min(h, w) * rng.uniform(0.7, 1.0))
        top, left = rng.integers(0, h - cut + 1), rng.integers(0, w - cut + 1)
        image = Image.fromarray(photo[top:top + cut, left:left + cut]).resize((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def make_jpegs(root, count):
    """Writes `count` ImageNet-like JPEGs (~500x375, quality 92, ~100 KB) cut from scikit-image's
    photographs to root/train/class<i % 10>/<i>.jpg; returns their mean size in bytes."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    photos = source_photos()
    sizes = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        # A random crop of 60-100% of the photo, resized to an ImageNet-like 500x375 or 375x500.
        frac = rng.uniform(0.6, 1.0)
        ch, cw = int(h * frac), int(w * frac)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        target = (375, 500) if i % 3 else (500, 375)
        image = tf.image.resize(photo[top : top + ch, left : left + cw], target, antialias=True)
        data = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=92)
        folder = os.path.join(root, "train", f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
            f.write(data.numpy())
        sizes.append(len(data.numpy()))
    return sum(sizes) / len(sizes)


def prepare_once(root):
    """Prepares the folder tree with alexnet_tf.prepare; returns the prepared directory."""
    import io

    from alexnet_tf import prepare

    out = os.path.join(root, "prepared")
    start, cpu_start = time.perf_counter(), time.process_time()
    description = prepare.prepare(f"folder:{root}", out, splits=("train",), out=io.StringIO())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    split = description["splits"]["train"]
    n = split["records"]
    print(f"prepare.py: {n} images in {seconds:.1f} s = {n / seconds:.0f} img/s "
          f"({1000 * cpu / n:.2f} CPU ms/img, start-up included); "
          f"{split['bytes_in'] / 1e6:.1f} MB in, {split['bytes_out'] / 1e6:.1f} MB out "
          f"({split['bytes_out'] / n / 1024:.1f} KiB per image at quality "
          f"{description['jpeg_quality']})", flush=True)
    return out


def latencies(call, warmup_steps, seconds):
    """Seconds of each timed call of `call()`: `warmup_steps` untimed calls, then calls until
    `seconds` have passed and at least 5 were made."""
    for _ in range(warmup_steps):
        call()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def median(values):
    """The middle value (the upper of the two middle ones for an even count)."""
    values = sorted(values)
    return values[len(values) // 2]


def percentile(values, q):
    """The q-th percentile as the nearest rank, one of the values themselves."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def versions():
    """The installed versions of the frameworks the benchmarks compare, from the packages'
    metadata (nothing is imported)."""
    from importlib import metadata

    found = []
    for package in ("tensorflow", "keras", "openvino", "onnxruntime", "tf2onnx", "torch"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def cpu_model():
    """The CPU's model name and its widest vector units (AMX, AVX-512, AVX2), from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")),
                "unknown CPU")
    flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    units = [unit for flag, unit in (("amx_tile", "AMX"), ("avx512_vnni", "AVX-512 VNNI"),
                                     ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
    return f"{name} ({units[0] if units else 'no AVX2'})"


def seeded_export(export_dir, variant, jpegs):
    """A seeded `variant` model exported by `serving.export_saved_model` as export.py exports it,
    for the request images `jpegs`, its classifier re-centred and sharpened x200 on them
    (tests.helpers.recentre_classifier), so that each gets a clear answer to compare engines on.

    Returns:
        (model, its PreprocessConfig, export path, the images as TensorFlow decodes them, uint8
        [N, H, W, 3], and their evaluation views, float32 [N, S, S, 3]).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import alexnet_tf
    from alexnet_tf import preprocessing, serving
    from alexnet_tf.model import DEFAULT_IMAGE_SIZE
    from tests.helpers import recentre_classifier

    keras.utils.set_random_seed(0)
    model = alexnet_tf.AlexNet(variant=variant)
    size = DEFAULT_IMAGE_SIZE[variant]
    preprocess = preprocessing.PreprocessConfig(image_size=size,
                                            resize_size=preprocessing.resize_size_for(size))
    # The pixels a TensorFlow client decodes: the ones serving_default decodes in its graph.
    images = np.stack([tf.io.decode_jpeg(data).numpy() for data in jpegs])
    views = preprocessing.eval_images(images, preprocess).numpy()
    recentre_classifier(model, views, sharpness=200)
    path = serving.export_saved_model(model, export_dir, [f"class{i}" for i in range(1000)],
                                      preprocess, version=1)
    return model, preprocess, path, images, views


def serving_session(export, signature):
    """A SavedModel loaded as tensorflow_model_server loads it (the C++ loader behind a v1
    Session, tag "serve"): call(feed) -> {output name: array} for one signature."""
    import tensorflow as tf

    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], export)
    sig = meta.signature_def[signature]
    (feed,) = [tensor.name for tensor in sig.inputs.values()]
    fetches = {key: tensor.name for key, tensor in sig.outputs.items()}
    return lambda data: session.run(fetches, {feed: data})
