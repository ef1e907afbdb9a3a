"""tf.data service servers for train.py --data_service: input processing on other machines' CPUs.

    python -m alexnet_tf.data_service dispatcher --port=5050 [--work_dir=DIR]
    python -m alexnet_tf.data_service worker --dispatcher=HOST:5050 --port=5051 \
        [--worker_address=THIS_HOST:5051]

The dispatcher hands out the training files (distributed_epoch mode: each file goes to one
worker per epoch); each worker runs train.py's training pipeline on its files (read, decode,
crop, uint8 batches) and streams the batches to the trainer. Thin wrappers over
tf.data.experimental.service.DispatchServer and WorkerServer; both stop cleanly on SIGTERM or
SIGINT.

Each server runs in a child process that is started again when it dies (SIGKILL, out of
memory, a crash), at the same address. TensorFlow's recovery needs that: a trainer whose worker
disappears waits for that worker to come back, and gets its remaining share of the epoch from
the restarted one (the files the lost process had in hand are skipped for that epoch). With
--work_dir the dispatcher journals its state there (fault-tolerant mode) and is restarted the
same way; without one it is not, as a dispatcher without its journal has forgotten the jobs.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import types

from absl import app, flags

if __package__:
    from alexnet_tf import cli
else:  # this file run as a script by main(): its folder is on sys.path, TensorFlow is not
    import cli


# A child that keeps dying this soon after it started is not restarted more than this many
# times in a row (a broken installation, a port taken by another program).
QUICK_FAILURE_S = 10.0
MAX_QUICK_FAILURES = 5


SERVERS = ("dispatcher", "worker")


def define_flags():
    """The flags of `python -m alexnet_tf.data_service {dispatcher|worker}`."""
    flags.DEFINE_integer("port", None, "Port this server listens on.", required=True)
    flags.DEFINE_string("work_dir", None, "dispatcher: journal for a fault-tolerant dispatcher; "
                        "a restarted dispatcher resumes from it.")
    flags.DEFINE_string("dispatcher", None, "worker: the dispatcher's HOST:PORT.")
    flags.DEFINE_string("worker_address", None, "worker: HOST:PORT the trainer reaches this "
                        "worker at (default: localhost:PORT).")
    flags.DEFINE_bool("no_restart", False, "Serve in this process; do not start the server "
                      "again when it dies.")


def _settings(argv):
    """The server's settings from the parsed flags and the one positional argument, or a
    one-line error (exit status 2)."""
    FLAGS = flags.FLAGS
    if len(argv) != 2 or argv[1] not in SERVERS:
        cli.exit_with_error("data_service", "give the server to run: python -m "
                            "alexnet_tf.data_service {dispatcher|worker} --port=PORT ...")
    server = argv[1]
    wrong = [f"--{name}" for name in (("dispatcher", "worker_address") if server == "dispatcher"
                                      else ("work_dir",)) if FLAGS[name].present]
    if wrong:
        cli.exit_with_error("data_service", f"{', '.join(wrong)} is not a {server} flag")
    if server == "worker" and not FLAGS.dispatcher:
        cli.exit_with_error("data_service", "a worker needs --dispatcher=HOST:PORT")
    return types.SimpleNamespace(
        server=server, port=FLAGS.port, work_dir=FLAGS.work_dir, dispatcher=FLAGS.dispatcher,
        worker_address=FLAGS.worker_address, restart=not FLAGS.no_restart)


def serve(args):
    """Starts the server `args` describe and blocks until SIGTERM or SIGINT; then stops it."""
    import tensorflow as tf

    service = tf.data.experimental.service
    if args.server == "dispatcher":
        if args.work_dir:
            os.makedirs(args.work_dir, exist_ok=True)
        server = service.DispatchServer(service.DispatcherConfig(
            port=args.port, work_dir=args.work_dir, fault_tolerant_mode=bool(args.work_dir)))
        where = f"dispatcher on port {args.port}" + (
            f", journal in {args.work_dir}" if args.work_dir else "")
    else:
        server = service.WorkerServer(service.WorkerConfig(
            dispatcher_address=args.dispatcher, port=args.port,
            worker_address=args.worker_address or f"localhost:{args.port}"))
        where = f"worker on port {args.port} for dispatcher {args.dispatcher}"
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"tf.data service {where} (process {os.getpid()})", flush=True)
    stop.wait()
    server.stop()
    print(f"stopped the {args.server} (process {os.getpid()})", flush=True)


def _die_with_parent():
    """In the child, before exec: SIGTERM when the supervising process dies, even by SIGKILL, so
    that no server outlives it (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _ended(code):
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def supervise(args, argv):
    """Runs the server in a child process, and again whenever it dies; forwards SIGTERM and
    SIGINT to it and returns its exit status once it stops on one of them."""
    stop = threading.Event()
    child = None

    def forward(signum, _):
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    quick_failures = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "alexnet_tf.data_service", *argv, "--no_restart"],
            preexec_fn=_die_with_parent)
        if stop.is_set():  # a signal that came before `child` was set
            child.terminate()
        code = child.wait()
        if stop.is_set():  # the child may have had no handler yet
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
        if code in (0, 2):  # stopped from outside, or a usage error that would recur
            return code
        quick_failures = quick_failures + 1 if time.monotonic() - started < QUICK_FAILURE_S else 0
        if quick_failures >= MAX_QUICK_FAILURES:
            print(f"data_service: error: the {args.server} died {quick_failures} times in a row "
                  f"within {QUICK_FAILURE_S:g} s of starting ({_ended(code)}); giving up",
                  file=sys.stderr, flush=True)
            return 1
        print(f"data_service: the {args.server} (process {child.pid}) ended, {_ended(code)}; "
              "starting it again", file=sys.stderr, flush=True)
        time.sleep(1)


def main(argv):
    args = _settings(argv)
    if args.restart and (args.server == "worker" or args.work_dir):
        if "tensorflow" in sys.modules:
            # Imported with the alexnet_tf package (python -m): the supervisor needs none of it,
            # so it becomes this file run as a script, which imports no TensorFlow (~0.6 GB).
            os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
        sys.exit(supervise(args, sys.argv[1:]))
    try:
        serve(args)
    except (OSError, RuntimeError, ValueError) as e:
        cli.exit_with_error("data_service", e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("data_service"))
