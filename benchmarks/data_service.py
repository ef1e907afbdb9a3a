"""The training pipeline through a tf.data service against the same pipeline in-process.

Generates ImageNet-like JPEGs (common.make_jpegs), prepares them (prepare.py's 256 x 256 form)
and measures make_dataset("prepared:DIR", training=True), the pipeline
train.py runs (uint8 227 x 227 crops, batch 128):

  in-process            in this process, as train.py without --data_service
  service               through a dispatcher and one worker, each a `python -m
                        alexnet_tf.data_service` process on this machine, batches not
                        compressed on the wire (what train.py does)
  service, compressed   the same with tf.data service's compression="AUTO"

For each: images/s received here; this process's CPU time per image (in-process: the whole
pipeline; through the service: receiving, decompressing and deserialising); and the bytes per
image on the wire, from the loopback interface's counters (/proc/net/dev). On a machine with
few cores the worker and the trainer share them, so this measures the service's overhead, not
the speed-up of adding machines.

Example:
    pip install scikit-image && python benchmarks/data_service.py --images=600
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

flags.DEFINE_integer("images", 600, "JPEG files to generate.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("batches", 30, "Timed batches per measurement, after the first.")
flags.DEFINE_integer("repeats", 3, "Measurements of each pipeline, interleaved; the median is "
                     "reported.")
flags.DEFINE_string("dir", None, "Where to write the files (default: a temporary directory).")
FLAGS = flags.FLAGS


def loopback_bytes():
    """Bytes received so far on the loopback interface (each byte sent on it is received once)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def measure(ds):
    """(images/s, this process's CPU ms per image, bytes per image received on loopback) over
    FLAGS.batches batches of one iterator, after its first batch."""
    iterator = iter(ds)
    next(iterator)
    images = 0
    start, cpu_start, bytes_start = time.perf_counter(), time.process_time(), loopback_bytes()
    for _ in range(FLAGS.batches):
        images += int(next(iterator)[1].shape[0])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return images / seconds, 1000 * cpu / images, (loopback_bytes() - bytes_start) / images


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service():
    """A dispatcher and one worker as processes; returns (address, processes) once both serve."""
    port, worker_port = free_port(), free_port()
    command = [sys.executable, "-m", "alexnet_tf.data_service"]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    processes = [
        subprocess.Popen([*command, "dispatcher", f"--port={port}"], env=env,
                         stdout=subprocess.PIPE, text=True),
        subprocess.Popen([*command, "worker", f"--dispatcher=localhost:{port}",
                          f"--port={worker_port}"], env=env, stdout=subprocess.PIPE, text=True),
    ]
    for process in processes:
        print(process.stdout.readline().strip(), flush=True)
    return f"grpc://localhost:{port}", processes


def main(argv):
    del argv
    import numpy as np

    from alexnet_tf import data, inputs, sources

    root = FLAGS.dir or tempfile.mkdtemp(prefix="alexnet_jpegs_")
    mean_bytes = common.make_jpegs(root, FLAGS.images)
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(TensorFlow's default)")
    print(f"{FLAGS.images} JPEGs, mean {mean_bytes / 1024:.0f} KiB; {os.cpu_count()} cores; "
          f"batch {FLAGS.batch_size}; TF_ENABLE_ONEDNN_OPTS={onednn}", flush=True)
    source = sources.Source(f"prepared:{common.prepare_once(root)}")
    config = inputs.preprocess_config(source.info("train"))
    address, processes = start_service()
    try:
        def pipeline(compression=False):
            # The files repeat within one pipeline, so that a measurement stays inside one
            # tf.data service job (train.py starts one job per epoch; see the start-up line).
            ds, _ = data.make_dataset(source, "train", True, FLAGS.batch_size, config,
                                      data.Options(repeat=True))
            if compression is False:
                return ds
            # train.py's pipeline (make_dataset's data_service) with the compression chosen.
            return data._through_service(ds, address, repeat=False, compression=compression)

        pipelines = {"in-process": lambda: pipeline(),
                     "service": lambda: pipeline(None),
                     "service, compressed": lambda: pipeline("AUTO")}
        results = {name: [] for name in pipelines}
        for repeat in range(FLAGS.repeats):
            for name, make in pipelines.items():
                results[name].append(measure(make()))
                rate, cpu, wire = results[name][-1]
                print(f"  repeat {repeat + 1} {name:22s} {rate:7.0f} img/s  {cpu:5.2f} CPU "
                      f"ms/img here  {wire / 1024:7.1f} KiB/img on the wire", flush=True)
        # What each epoch pays to start: train.py's service pipeline starts a job per epoch.
        for name, service in (("in-process", None), ("service", address)):
            ds, _ = data.make_dataset(source, "train", True, FLAGS.batch_size, config,
                                      data.Options(data_service=service))
            starts = []
            for _ in range(FLAGS.repeats):
                start = time.perf_counter()
                for _ in ds:  # one epoch
                    if len(starts) < FLAGS.repeats and start:
                        starts.append(time.perf_counter() - start)
                        start = None
            print(f"  {name}: first batch of an epoch after {np.median(starts):.2f} s "
                  f"(median of {FLAGS.repeats} epochs)", flush=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    median = {name: np.median(np.array(r), axis=0) for name, r in results.items()}
    print(f"median of {FLAGS.repeats} ({FLAGS.batches} batches of {FLAGS.batch_size} each):")
    for name, (rate, cpu, wire) in median.items():
        print(f"  {name:22s} {rate:7.0f} img/s  {cpu:5.2f} CPU ms/img here  "
              f"{wire / 1024:7.1f} KiB/img on the wire")
    base = median["in-process"][0]
    print(f"service vs in-process: {median['service'][0] / base:.0%}; compressed: "
          f"{median['service, compressed'][0] / base:.0%}; a 227x227x3 uint8 crop is "
          f"{227 * 227 * 3 / 1024:.1f} KiB")


if __name__ == "__main__":
    app.run(main)
