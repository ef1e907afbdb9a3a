"""Everything a GPU user runs, checked and timed by one command in six minutes on one H100/H200.

    pip install -e '.[gpu]' && python benchmarks/gpu.py          # on the GPU machine
    python benchmarks/gpu.py --smoke                              # every part, tiny, on a CPU

Parts, each in processes of its own (TensorFlow and PyTorch cannot share one) under a budget of
its own (BUDGET, 360 s in all, printed); a part that fails or runs out of time becomes a row
saying so, and the others go on:

    train   training img/s on synthetic uint8 batches already on the device, through the device
            input stage, with XLA: both variants at batch 1,024 in bfloat16, the paper model in
            float16 (LRN under XLA; --cases adds float32, TF32), and at train.py's batch
            (--run_batch) for the ratio below; each case's peak GPU memory. Timed twice: one
            step per call (train_on_batch, which waits for each), and as train.py runs it
            ("fit": several steps per call, each batch copied from the host ahead)
    torch   the same networks in PyTorch on the same GPU: bf16 autocast, channels_last, eager
            and torch.compile
    input   prepared: data made from photographs (prepare.py), read by make_dataset's training
            pipeline with 1, 4 ... host cores beside decoding the same files alone
    run     train.py on that data as a user runs it (XLA and steps per call on auto), its
            steady-state rate (epoch 2) beside the synthetic rate at the same batch; the same
            through MirroredStrategy over two logical GPUs carved from one (the multi-replica
            path); on a GPU, the paper model's batch of 4,096 on a 2 GB logical GPU, which must
            end in train.py's one-line out-of-memory error; then export.py
    serve   the export loaded as TF Serving loads it (tests/native/load_saved_model.cc, the C
            API, XLA off): serving_default on real JPEG bytes, batch 1 and 128

The cases of train and torch compile at once, each in its own process (XLA and torch.compile
take 30-50 s a case, on the host's cores), and take turns on the GPU for their timed steps (a
lock file), so that no case's figures include another's work.

Prints one table (Markdown): part, case, img/s, ms per step or request, peak memory, note.
"""

import fcntl
import json
import os
import shutil
import signal
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
flags.DEFINE_list("cases", ["paper b1024 bfloat16", "one_weird_trick b1024 bfloat16",
                            "paper b1024 float16"],
                  "Cases of train and torch: 'variant bBATCH dtype' (train also runs the paper "
                  "model at --run_batch in bfloat16).")
flags.DEFINE_integer("steps", 20, "Timed steps per case (after --warmup_steps).")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps per case (tracing, XLA, autotuning).")
flags.DEFINE_integer("images", 2048, "Photographs made and prepared for input, run and serve.")
flags.DEFINE_integer("run_batch", 256, "train.py's batch per GPU (configs/imagenet_caffe.cfg's).")
flags.DEFINE_integer("run_steps", 200, "train.py's steps per epoch (two epochs; epoch 2 timed).")
flags.DEFINE_string("run_variant", "paper", "train.py's variant (--smoke: cifar, whose backups "
                    "and checkpoints are MBs, not the paper model's 0.5 GB each).")
flags.DEFINE_string("workdir", None, "Where the data, the run and the export go (default: a "
                    "temporary directory, removed at the end).")
flags.DEFINE_string("part", None, "Internal: run one part in this process and print its rows.")
flags.DEFINE_string("case", None, "Internal: run one case of --part in this process.")
FLAGS = flags.FLAGS

SMOKE = dict(cases=["paper b2 float32", "paper b2 float16"], steps=2, warmup_steps=1, images=48,
             run_batch=2, run_steps=3, run_variant="cifar")
# Seconds each part may take before it is stopped: 360 in all.
BUDGET = {"train": 110, "torch": 60, "input": 45, "run": 120, "serve": 25}
# --smoke on a CPU: each part may take this many times its budget. The smoke checks that every
# part runs, not how fast: a 2-core CPU, a slower kind of CPU or a busy machine must not stop it.
SMOKE_BUDGET_FACTOR = 4


def emit(part, case, rate=None, ms=None, memory=None, note=""):
    """One row, as a line the parent process reads."""
    print("ROW " + json.dumps(dict(part=part, case=case, rate=rate, ms=ms, memory=memory,
                                   note=note)), flush=True)


def one_line(error):
    return " ".join(str(error).split())[:160]


# --------------------------------------------------------------------------------------------
# The parts, each run in a child process (`--part=NAME`)


def parse_case(case):
    """'paper b1024 bfloat16' -> ("paper", 1024, "bfloat16")."""
    variant, batch, dtype = case.split()
    return variant, int(batch.lstrip("b")), dtype


def train_cases():
    cases = list(FLAGS.cases)
    at_run_batch = f"paper b{FLAGS.run_batch} bfloat16"
    return cases if at_run_batch in cases else [*cases, at_run_batch]


def run_cases(part, workdir, cases):
    """Runs each case of `part` in a child process of its own, all at once: each compiles, then
    takes the GPU lock for its timed steps. Emits their rows as they come."""
    children = [(case, start_part(part, workdir, case)) for case in cases]
    for case, child in children:
        out, err = child.communicate()
        rows = _rows(out)
        for row in rows:
            emit(**row)
        if child.returncode and not rows:
            last = (err.strip().splitlines() or ["no output"])[-1]
            emit(part, case, note=f"FAILED: exit {child.returncode}: {one_line(last)}")


class GpuTurn:
    """The GPU to one case at a time: an exclusive lock on a file in the workdir."""

    def __init__(self, workdir):
        self.path = os.path.join(workdir, "gpu.lock")

    def __enter__(self):
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def part_train(workdir):
    if FLAGS.case is None:
        run_cases("train", workdir, train_cases())
        return
    import keras
    import tensorflow as tf

    import alexnet_tf
    from alexnet_tf import devices, preprocessing, preprocessing_layers
    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    variant, batch, dtype = parse_case(FLAGS.case)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # several cases share the GPU while they compile
        tf.config.experimental.set_memory_growth(gpu, True)
    device = "/gpu:0" if gpus else "/cpu:0"
    # Every case with XLA, as train.py runs on a GPU (jit_compile auto). float16: LRN under
    # XLA (openxla/xla#43450 fails on TensorFlow's own in float16; the layer computes in
    # float32). float32 runs as TF32 on the tensor cores (TensorFlow's default).
    keras.config.set_dtype_policy("float32" if dtype == "float32" else f"mixed_{dtype}")
    size = DEFAULT_IMAGE_SIZE[variant]
    model = alexnet_tf.AlexNet(variant=variant)
    per_call = devices.steps_per_execution(devices.DeviceFacts.of_this_machine(), FLAGS.steps)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True, steps_per_execution=per_call)
    pre = preprocessing.PreprocessConfig(image_size=size, resize_size=256)
    preprocessing_layers.run_input_stage(model, preprocessing_layers.InputStage(pre, seed=0))
    with tf.device(device):  # on the device already: the step alone is timed
        images = tf.cast(tf.random.uniform([batch, size, size, 3], 0, 256, tf.int32), tf.uint8)
        labels = tf.random.uniform([batch], 0, 1000, tf.int32)
    model.train_on_batch(images, labels)  # traces and compiles, beside the other cases
    # The same step as train.py runs it: calls of several steps, each batch copied from the
    # host ahead of its step (devices.input_device).
    with tf.device("/cpu:0"):
        host = tf.data.Dataset.from_tensors((tf.identity(images), tf.identity(labels))).repeat()
    copied = host.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=2))
    clock = common.step_clock(per_call)  # from the end of the first call
    model.fit(copied, steps_per_epoch=per_call, epochs=1, verbose=0)  # traces the calls
    with GpuTurn(workdir):
        for _ in range(FLAGS.warmup_steps):
            model.train_on_batch(images, labels)
        if gpus:
            tf.config.experimental.reset_memory_stats("GPU:0")
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            loss = model.train_on_batch(images, labels)
        elapsed = time.perf_counter() - start
        calls = max(FLAGS.steps // per_call, 1)
        model.fit(copied, steps_per_epoch=(calls + 1) * per_call, epochs=1, verbose=0,
                  callbacks=[clock])
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpus else None
    emit("train", f"{FLAGS.case} XLA", FLAGS.steps * batch / elapsed,
         1000 * elapsed / FLAGS.steps, peak, "" if np_finite(loss) else "loss not finite")
    fit_seconds = clock.end - clock.start
    emit("train", f"{FLAGS.case} XLA fit", calls * per_call * batch / fit_seconds,
         1000 * fit_seconds / (calls * per_call), note=f"{per_call} steps per call, batches "
         "copied from the host ahead")


def np_finite(value):
    import numpy as np

    return bool(np.all(np.isfinite(np.asarray(value, dtype=float))))


def part_torch(workdir):
    import torch

    cuda = torch.cuda.is_available()
    if FLAGS.case is None:
        # Eager and torch.compile for the bfloat16 cases (PyTorch's best on this GPU); on a
        # CPU, eager only.
        cases = [f"{case} {mode}" for case in FLAGS.cases if cuda or case == FLAGS.cases[0]
                 for mode in (["eager", "compile"] if cuda else ["eager"])
                 if parse_case(case)[2] == "bfloat16" or not cuda]
        run_cases("torch", workdir, cases)
        return
    variant, batch, dtype, mode = (*parse_case(" ".join(FLAGS.case.split()[:3])),
                                   FLAGS.case.split()[3])
    emit("torch", FLAGS.case, *_torch_rate(torch, "cuda" if cuda else "cpu", variant, batch,
                                           dtype, mode == "compile", workdir))


def _torch_rate(torch, device, variant, batch, dtype, compiled, workdir):
    """(img/s, ms/step, peak MB) of SGD-momentum training of the same network."""
    import contextlib

    from alexnet_tf.model import DEFAULT_IMAGE_SIZE

    size = DEFAULT_IMAGE_SIZE[variant]
    torch.manual_seed(0)
    model = common.torch_alexnet(variant).to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast(device, dtype=getattr(torch, dtype))
                    if dtype != "float32" else contextlib.nullcontext())
        with autocast:
            loss = loss_fn(step_model(images), labels)
        loss.backward()
        optimizer.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # compiles, beside the other cases
    sync()
    with GpuTurn(workdir):
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
    batch = FLAGS.run_batch
    cores = os.cpu_count()
    for threads in sorted({1, min(4, cores), cores}):
        ds, _ = data.make_dataset(source, "train", True, batch, pre,
                                  data.Options(repeat=True, seed=0))
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        iterator = iter(ds.with_options(options))
        for _ in range(2):
            next(iterator)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < (1 if FLAGS.smoke else 4):
            count += int(next(iterator)[0].shape[0])
        elapsed = time.perf_counter() - start
        emit("input", f"prepared b{batch}, {threads} host core(s)", count / elapsed,
             1000 * elapsed * batch / count, note=f"{count / elapsed / threads:,.0f} img/s a core")


# train.py as a user runs it on two logical GPUs carved from one: the logical devices must be
# made before TensorFlow starts, so a small launcher makes them, then runs train.py's main.
TWO_LOGICAL_GPUS = """
import runpy, sys
import tensorflow as tf
gpu = tf.config.list_physical_devices("GPU")[0]
tf.config.set_logical_device_configuration(
    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=30000)] * 2)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# A GPU with 2 GB of memory: the paper model's batch of 4,096 (about 36 GB) cannot fit.
SMALL_GPU = TWO_LOGICAL_GPUS.replace("memory_limit=30000)] * 2", "memory_limit=2048)]")


def _train_py(workdir, name, batch, epochs, steps, extra=(), launcher=None):
    """Runs train.py; (its last epoch's img/s from history.csv, wall seconds) or a failure."""
    run = os.path.join(workdir, name)
    shutil.rmtree(run, ignore_errors=True)
    args = [f"--dataset=prepared:{prepared_data(workdir)}", f"--variant={FLAGS.run_variant}",
            f"--batch_size={batch}", f"--epochs={epochs}", f"--steps_per_epoch={steps}",
            "--mixed_precision=auto", "--eval_steps=1", f"--workdir={run}", *extra]
    command = [sys.executable, *(["-c", launcher] if launcher else []),
               os.path.join(ROOT, "train.py"), *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(one_line((result.stderr.strip().splitlines() or ["?"])[-1]))
    return common.last_epoch_rate(run), seconds, run


def part_run(workdir):
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    batch = FLAGS.run_batch
    run = None
    try:
        rate, seconds, run = _train_py(workdir, "run", batch, 2, FLAGS.run_steps)
        emit("run", f"train.py {FLAGS.run_variant}, 1 {'GPU' if gpus else 'CPU'}, batch {batch}",
             rate, 1000 * batch / rate,
             note=f"epoch 2 of 2 x {FLAGS.run_steps} steps; {seconds:.0f} s with start-up")
    except RuntimeError as e:
        emit("run", "train.py", note=f"FAILED: {e}")
    # The multi-replica path: XLA compiled per replica (keras_compat.replica_compiled_train_step).
    try:
        steps = max(FLAGS.run_steps // 3, 2)
        extra = ["--strategy=mirrored", "--jit_compile=true",
                 *(["--cpu_replicas=2"] if not gpus else [])]
        rate, seconds, _ = _train_py(workdir, "run_mirrored", 2 * batch, 1, steps, extra,
                                     launcher=TWO_LOGICAL_GPUS if gpus else None)
        emit("run", f"train.py {FLAGS.run_variant}, MirroredStrategy over 2 logical "
             f"{'GPUs of one' if gpus else 'CPUs'}, batch {batch} each", rate,
             1000 * 2 * batch / rate, note=f"1 epoch of {steps} steps; {seconds:.0f} s with "
             "start-up")
    except RuntimeError as e:
        emit("run", "train.py MirroredStrategy", note=f"FAILED: {e}")
    if gpus:  # a batch that does not fit: one line and exit status 2 (on a CPU: the suite's)
        try:
            _train_py(workdir, "run_oom", 4096, 1, 2, ["--variant=paper", "--jit_compile=false"],
                      launcher=SMALL_GPU)
            emit("run", "train.py, a batch that does not fit", note="FAILED: it trained")
        except RuntimeError as e:
            fits = "out of memory training" in str(e)
            emit("run", "train.py paper, batch 4,096 on a 2 GB logical GPU",
                 note=f"{'one line' if fits else 'FAILED'}: {e}")
    if run is None:
        return
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
    for package in ("tensorflow", "keras", "torch", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13"):
        try:
            facts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            facts.append(f"{package} not installed")
    return "; ".join(facts)


def start_part(part, workdir, case=None):
    """A child process running one part (or one case of it) with this command's flags, in a
    process group of its own, so that a part stopped at its budget takes its cases along."""
    command = [sys.executable, os.path.abspath(__file__), f"--part={part}", f"--workdir={workdir}",
               *([f"--case={case}"] if case else []),
               *[a for a in sys.argv[1:] if not a.startswith(("--part=", "--workdir=", "--case="))]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
                            start_new_session=case is None)


def finish_part(part, child):
    """The rows of a part's child process; a failure, or a part that outlives its budget (it
    is then stopped, its cases with it), is a row too."""
    limit = BUDGET[part] * (SMOKE_BUDGET_FACTOR if FLAGS.smoke else 1)
    try:
        out, err = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
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


def ratio(rows):
    """train.py's rate on one device over the synthetic rate of its model at its batch, both
    with several steps per call."""
    synthetic = next((r["rate"] for r in rows if r["part"] == "train" and r["rate"]
                      and r["case"] == f"paper b{FLAGS.run_batch} bfloat16 XLA fit"), None)
    run = next((r["rate"] for r in rows if r["part"] == "run" and r["rate"]
                and "Mirrored" not in r["case"]), None)
    if synthetic is None or run is None or FLAGS.run_variant != "paper":
        return "train.py / synthetic: not measured (a part failed, or --run_variant is not paper)"
    return (f"train.py / synthetic at batch {FLAGS.run_batch}: {run:,.0f} / {synthetic:,.0f} = "
            f"{run / synthetic:.2f}")


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
    os.makedirs(workdir, exist_ok=True)
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
    print(ratio(rows))
    print(f"in all {time.perf_counter() - start:.0f} s; budgets "
          f"{' + '.join(f'{p} {BUDGET[p]}' for p in PARTS)} = {sum(BUDGET.values())} s", flush=True)
    failed = [r for r in rows if r["note"].startswith(("FAILED", "STOPPED"))]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
