"""Everything a GPU user runs, checked and timed by one command (about 8 minutes on one H100).

    pip install -e '.[gpu]' && python benchmarks/gpu.py          # on the GPU machine
    python benchmarks/gpu.py --smoke                              # every part, tiny, on a CPU

Parts, each in a process of its own (TensorFlow and PyTorch cannot share one; a part that fails
or runs out of time becomes a row saying so, and the others go on):

    train   training img/s on synthetic uint8 batches already on the device, through the device
            input stage: variants x batch per GPU x bfloat16/float32 (TF32) x jit_compile, and
            each case's peak GPU memory; a float16 case under XLA checks LRN there
    torch   the same networks in PyTorch on the same GPU: bf16 autocast, channels_last,
            torch.compile
    input   prepared: data made from photographs (prepare.py), read by make_dataset's training
            pipeline with 1, 2, 4 ... host cores: does input keep up with the training step?
    run     train.py on that data through MirroredStrategy over every visible GPU, the input
            stage on the device, a backup every 50 steps, then export.py
    serve   the export loaded as TF Serving loads it (tests/native/load_saved_model.cc, the C
            API, XLA off): serving_default on real JPEG bytes, batch 1 and 128

Prints one table (Markdown): part, case, img/s, ms per step or request, peak memory, note.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("train", "torch", "input", "run", "serve")

flags.DEFINE_bool("smoke", False, "Every part at tiny sizes, for a CPU (the suite runs it).")
flags.DEFINE_list("parts", list(PARTS), "Parts to run, in this order.")
flags.DEFINE_list("variants", ["paper", "one_weird_trick"], "Variants of train and torch.")
flags.DEFINE_list("batch_sizes", ["256", "1024"], "Batch sizes per GPU of train and torch.")
flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes of train and torch.")
flags.DEFINE_list("jit", ["false", "true"], "jit_compile settings of train.")
flags.DEFINE_integer("steps", 30, "Timed steps per case (after --warmup_steps).")
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps per case (tracing, autotuning).")
flags.DEFINE_integer("images", 2048, "Photographs made and prepared for input, run and serve.")
flags.DEFINE_integer("run_steps", 150, "train.py's steps per epoch (two epochs).")
flags.DEFINE_string("run_variant", "paper", "train.py's variant (--smoke: cifar, whose backups "
                    "and checkpoints are MBs, not the paper model's 0.5 GB each).")
flags.DEFINE_string("workdir", None, "Where the data, the run and the export go (default: a "
                    "temporary directory, removed at the end).")
flags.DEFINE_string("part", None, "Internal: run one part in this process and print its rows.")
FLAGS = flags.FLAGS

SMOKE = dict(variants=["paper"], batch_sizes=["2"], dtypes=["float32", "bfloat16"],
             jit=["false", "true"], steps=2, warmup_steps=1, images=48, run_steps=3,
             run_variant="cifar")
# Seconds each part may take before it is stopped (the whole check fits in about 8 minutes).
BUDGET = {"train": 210, "torch": 120, "input": 90, "run": 150, "serve": 60}


def emit(part, case, rate=None, ms=None, memory=None, note=""):
    """One row, as a line the parent process reads."""
    print("ROW " + json.dumps(dict(part=part, case=case, rate=rate, ms=ms, memory=memory,
                                   note=note)), flush=True)


def one_line(error):
    return " ".join(str(error).split())[:160]


# --------------------------------------------------------------------------------------------
# The parts, each run in a child process (`--part=NAME`)


def part_train(workdir):
    import keras
    import tensorflow as tf

    import alexnet_tf
    from alexnet_tf import preprocessing, preprocessing_layers, training
    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    gpus = tf.config.list_physical_devices("GPU")
    device = "/gpu:0" if gpus else "/cpu:0"
    # Every combination; --smoke: each dtype and each jit setting once (zipped), which is all
    # that a check that the code runs needs.
    pairs = (list(zip(FLAGS.dtypes, FLAGS.jit)) if FLAGS.smoke
             else [(d, j) for d in FLAGS.dtypes for j in FLAGS.jit])
    cases = [(v, int(b), d, j == "true") for v in FLAGS.variants for b in FLAGS.batch_sizes
             for d, j in pairs]
    # LRN under XLA in float16 (openxla/xla#43450 fails on it): the layer computes in float32.
    cases.append((FLAGS.variants[0], int(FLAGS.batch_sizes[0]), "float16", True))
    for variant, batch, dtype, jit in cases:
        case = f"{variant} b{batch} {dtype} jit={'on' if jit else 'off'}"
        try:
            keras.backend.clear_session()
            keras.config.set_dtype_policy("float32" if dtype == "float32" else f"mixed_{dtype}")
            if gpus:
                tf.config.experimental.reset_memory_stats("GPU:0")
            size = DEFAULT_IMAGE_SIZE[variant]
            model = alexnet_tf.AlexNet(variant=variant)
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=jit)
            pre = preprocessing.PreprocessConfig(image_size=size, resize_size=256)
            training.run_input_stage(model, preprocessing_layers.InputStage(pre, seed=0))
            with tf.device(device):  # on the device already: the step alone is timed
                images = tf.cast(tf.random.uniform([batch, size, size, 3], 0, 256, tf.int32),
                                 tf.uint8)
                labels = tf.random.uniform([batch], 0, 1000, tf.int32)
            for _ in range(FLAGS.warmup_steps):
                model.train_on_batch(images, labels)
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                loss = model.train_on_batch(images, labels)
            elapsed = time.perf_counter() - start
            peak = (tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
                    if gpus else None)
            note = "" if np_finite(loss) else "loss not finite"
            emit("train", case, FLAGS.steps * batch / elapsed, 1000 * elapsed / FLAGS.steps,
                 peak, note)
        except Exception as e:  # a case that fails is a row; the others go on
            emit("train", case, note=f"FAILED: {type(e).__name__}: {one_line(e)}")
    keras.config.set_dtype_policy("float32")


def np_finite(value):
    import numpy as np

    return bool(np.all(np.isfinite(np.asarray(value, dtype=float))))


def part_torch(workdir):
    import contextlib

    import torch

    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    for variant in FLAGS.variants:
        for batch in (int(b) for b in FLAGS.batch_sizes):
            for dtype in FLAGS.dtypes:
                for compiled in ([False, True] if cuda else [False]):
                    case = f"{variant} b{batch} {dtype}{' compile' if compiled else ''}"
                    try:
                        emit("torch", case, *_torch_rate(torch, contextlib, device, variant, batch,
                                                         DEFAULT_IMAGE_SIZE[variant], dtype,
                                                         compiled))
                    except Exception as e:
                        emit("torch", case, note=f"FAILED: {type(e).__name__}: {one_line(e)}")


def _torch_rate(torch, contextlib, device, variant, batch, size, dtype, compiled):
    """(img/s, ms/step, peak MB) of SGD-momentum training of the same network."""
    torch.manual_seed(0)
    model = common.torch_alexnet(variant).to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16"
                    else contextlib.nullcontext())
        with autocast:
            loss = loss_fn(step_model(images), labels)
        loss.backward()
        optimizer.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(FLAGS.warmup_steps):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return FLAGS.steps * batch / elapsed, 1000 * elapsed / FLAGS.steps, peak


def prepared_data(workdir):
    """prepared: data of FLAGS.images photographs (both splits), made once per workdir."""
    out = os.path.join(workdir, "prepared")
    if not os.path.exists(os.path.join(out, "dataset.json")):
        import io

        from alexnet_tf import prepare

        photos = os.path.join(workdir, "photos")
        common.make_jpegs(photos, FLAGS.images)
        # common.make_jpegs writes photos/train/<class>/: as one folder, a 90/10 hash split.
        prepare.prepare(f"folder:{os.path.join(photos, 'train')}", out, out=io.StringIO())
    return out


def part_input(workdir):
    import tensorflow as tf

    from alexnet_tf import data, inputs, sources

    source = sources.Source(f"prepared:{prepared_data(workdir)}")
    pre = inputs.preprocess_config(source.info("train"))
    batch = int(FLAGS.batch_sizes[0])
    cores, counts = os.cpu_count(), []
    while not counts or counts[-1] < cores:
        counts.append(min(cores, 2 ** len(counts)))
    for threads in counts:
        ds, _ = data.make_dataset(source, "train", True, batch, pre,
                                  data.Options(repeat=True, device_stage=True, seed=0))
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        iterator = iter(ds.with_options(options))
        for _ in range(2):
            next(iterator)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < (1 if FLAGS.smoke else 5):
            count += int(next(iterator)[0].shape[0])
        elapsed = time.perf_counter() - start
        emit("input", f"prepared b{batch}, {threads} host core(s)", count / elapsed,
             1000 * elapsed * batch / count)


def part_run(workdir):
    import tensorflow as tf

    replicas = len(tf.config.list_physical_devices("GPU"))
    cpu = replicas == 0
    batch = int(FLAGS.batch_sizes[0]) * max(replicas, 2 if cpu else 1)
    run = os.path.join(workdir, "run")
    shutil.rmtree(run, ignore_errors=True)
    args = [f"--dataset=prepared:{prepared_data(workdir)}", f"--variant={FLAGS.run_variant}",
            "--strategy=mirrored",
            f"--batch_size={batch}", "--epochs=2", f"--steps_per_epoch={FLAGS.run_steps}",
            "--checkpoint_every_steps=50", "--mixed_precision=auto", "--eval_steps=1",
            f"--workdir={run}", *(["--cpu_replicas=2"] if cpu else [])]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        emit("run", "train.py", note=f"FAILED: {one_line(result.stderr.strip().splitlines()[-1])}")
        return
    with open(os.path.join(run, "history.csv")) as f:
        rows = f.read().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    rate = float(last[header.index("images_per_sec")])
    emit("run", f"train.py {FLAGS.run_variant}, {replicas or 2} {'CPU' if cpu else 'GPU'} "
         "replica(s), "
         f"global batch {batch}", rate, 1000 * batch / rate,
         note=f"2 epochs x {FLAGS.run_steps} steps in {seconds:.0f} s with start-up; "
              "epoch 2's rate; backups every 50 steps")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={run}",
                             f"--export_dir={os.path.join(workdir, 'export')}", "--overwrite",
                             "--version=1"], capture_output=True, text=True)
    emit("run", "export.py", note="exported" if result.returncode == 0 else
         f"FAILED: {one_line(result.stderr.strip().splitlines()[-1])}")


def part_serve(workdir):
    from tests.helpers import build_c_loader

    export = os.path.join(workdir, "export", "1")
    if not os.path.isdir(export):
        emit("serve", "serving_default", note="FAILED: no export (the run part makes it)")
        return
    loader = build_c_loader(os.path.join(workdir, "load_saved_model"))
    photos = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(workdir, "photos"))
                    for f in files)
    for batch in (1, 128):
        files = (photos * (batch // len(photos) + 1))[:batch]
        repeats = 3 if FLAGS.smoke else 20
        result = subprocess.run([loader, export, "serving_default", *files], capture_output=True,
                                text=True,
                                env=dict(os.environ, LOAD_SAVED_MODEL_REPEAT=str(repeats)))
        timing = [line for line in result.stderr.splitlines() if line.startswith("timing:")]
        if result.returncode or not timing:
            emit("serve", f"serving_default b{batch}",
                 note=f"FAILED: exit {result.returncode}: {one_line(result.stderr[-300:])}")
            continue
        fields = dict(field.split("=") for field in timing[0].split()[1:])
        p50 = float(fields["p50_ms"])
        emit("serve", f"serving_default b{batch}, JPEG bytes, C API", 1000 * batch / p50, p50,
             note=f"p99 {float(fields['p99_ms']):.1f} ms over {repeats} requests")


# --------------------------------------------------------------------------------------------
# The parent: machine facts, the parts in turn, the table


def machine():
    """One line: the GPUs, their driver and CUDA version, the framework versions (from the
    packages' metadata: this process imports neither framework)."""
    from importlib import metadata

    facts = []
    smi = shutil.which("nvidia-smi")
    if smi:
        names = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        header = subprocess.run([smi], capture_output=True, text=True).stdout
        cuda = header.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in header else "?"
        facts.append(f"{len(names)} x {names[0]} (CUDA {cuda})" if names else "no GPU")
    else:
        facts.append(f"no GPU (CPU, {os.cpu_count()} cores)")
    for package in ("tensorflow", "keras", "torch"):
        try:
            facts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            facts.append(f"{package} not installed")
    return "; ".join(facts)


def start_part(part, workdir):
    """A child process running one part with this command's flags."""
    command = [sys.executable, os.path.abspath(__file__), f"--part={part}", f"--workdir={workdir}",
               *[a for a in sys.argv[1:] if not a.startswith(("--part=", "--workdir="))]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))


def finish_part(part, child):
    """The rows of a part's child process; a failure, or a part that outlives its budget (it
    is then stopped), is a row too."""
    limit = BUDGET[part]
    try:
        out, err = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        return _rows(out) + [dict(part=part, case="-", rate=None, ms=None, memory=None,
                                  note=f"STOPPED after {limit} s")]
    rows = _rows(out)
    if child.returncode:
        last = (err.strip().splitlines() or ["no output"])[-1]
        rows.append(dict(part=part, case="-", rate=None, ms=None, memory=None,
                         note=f"FAILED: exit {child.returncode}: {one_line(last)}"))
    return rows


def _rows(stdout):
    return [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]


def table(rows):
    lines = ["| part | case | img/s | ms | peak memory (MiB) | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["part"], row["case"],
                 f"{row['rate']:,.0f}" if row["rate"] is not None else "-",
                 f"{row['ms']:.1f}" if row["ms"] is not None else "-",
                 f"{row['memory']:,.0f}" if row["memory"] is not None else "-", row["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv  # flags only
    if FLAGS.smoke:
        for name, value in SMOKE.items():
            if not FLAGS[name].present:
                setattr(FLAGS, name, value)
    workdir = FLAGS.workdir
    if FLAGS.part:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # train.py's default too
        {"train": part_train, "torch": part_torch, "input": part_input, "run": part_run,
         "serve": part_serve}[FLAGS.part](workdir)
        return
    unknown = set(FLAGS.parts) - set(PARTS)
    if unknown:
        raise app.UsageError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    temporary = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="alexnet_tf_gpu_")
    start = time.perf_counter()
    print(f"{machine()}\n{' '.join(['python benchmarks/gpu.py', *sys.argv[1:]])}", flush=True)
    rows = []
    try:
        for part in FLAGS.parts:  # one at a time, so that none slows another's figures
            part_start = time.perf_counter()
            part_rows = finish_part(part, start_part(part, workdir))
            print(f"{part}: {time.perf_counter() - part_start:.0f} s", flush=True)
            for row in part_rows:
                rate = "-" if row["rate"] is None else f"{row['rate']:,.0f} img/s"
                print(f"  {row['part']}: {row['case']}: {rate} {row['note']}", flush=True)
            rows += part_rows
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows))
    print(f"in all {time.perf_counter() - start:.0f} s", flush=True)
    failed = [r for r in rows if r["note"].startswith(("FAILED", "STOPPED"))]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
