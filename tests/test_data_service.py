"""Training input through a tf.data service: a dispatcher and two workers started as processes on
127.0.0.1 (python -m alexnet_tf.data_service), always stopped at the end of the test."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from alexnet_tf import data, prepare, preprocessing
from tests.helpers import (ROOT, assert_one_line_error, history, run_train, tiny_idx,
                           write_folder_tree)

pytestmark = pytest.mark.slow
CONFIG = preprocessing.PreprocessConfig(image_size=32, resize_size=36)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A dispatcher (journal in `directory`) and workers: `python -m alexnet_tf.data_service`
    processes, which supervise the processes that serve; their stderr goes to files there."""

    def __init__(self, directory):
        self.directory, self.port = directory, free_port()
        self.processes, self.serving, self.ports = {}, {}, [self.port]

    def start_all(self, workers=2):
        """Starts them all at once; returns when each serves."""
        self.start("dispatcher", "dispatcher", f"--port={self.port}",
                   f"--work_dir={self.directory / 'journal'}")
        for i in range(workers):
            port = free_port()
            self.ports.append(port)
            self.start(f"worker{i}", "worker", f"--dispatcher=localhost:{self.port}",
                       f"--port={port}")
        for name in self.processes:
            self.serving[name] = self.serving_pid(name)

    @property
    def address(self):
        return f"grpc://localhost:{self.port}"

    def start(self, name, *args):
        with open(self.directory / f"{name}.log", "a") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "alexnet_tf.data_service", *args],
                env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=log,
                text=True)

    def serving_pid(self, name):
        """The process id in the line the server prints once it listens."""
        line = self.processes[name].stdout.readline()
        assert line.startswith("tf.data service"), (self.directory / f"{name}.log").read_text()
        return int(line.rsplit("(process ", 1)[1].rstrip(")\n"))

    def kill_server(self, name):
        """SIGKILL to the process that serves `name`; its supervisor starts another."""
        os.kill(self.serving[name], signal.SIGKILL)
        self.serving[name] = self.serving_pid(name)

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def service(tmp_path):
    (tmp_path / "service").mkdir()
    service = Service(tmp_path / "service")
    try:
        service.start_all()
        yield service
    finally:
        service.stop()


def one_record_per_class(root, classes=12):
    write_folder_tree(root / "train", classes=[f"c{i:02d}" for i in range(classes)], per_class=1)
    write_folder_tree(root / "val", classes=[f"c{i:02d}" for i in range(classes)], per_class=1)
    return f"folder:{root}"


@pytest.mark.parametrize("prepared", [False, True], ids=["photos", "prepared"])
def test_each_epoch_delivers_every_record_once(service, tmp_path, prepared):
    source = one_record_per_class(tmp_path / "photos")
    if prepared:
        prepare.prepare(source, str(tmp_path / "prepared"), records_per_shard=2)
        source = f"prepared:{tmp_path / 'prepared'}"
    ds, _ = data.make_dataset(source, "train", True, 4, CONFIG, data.Options(
        data_service=service.address))
    for _ in range(2):  # each iteration is one job, one epoch
        labels = np.concatenate([y.numpy() for _, y in ds])
        assert sorted(labels.tolist()) == list(range(12))


def test_servers_stop_cleanly_on_sigterm(service):
    for process in service.processes.values():
        process.terminate()
    for name, process in service.processes.items():
        assert process.wait(20) == 0, name
        assert "stopped the" in process.stdout.read()


def test_train_py_trains_through_the_service(service, tmp_path):
    result = run_train(
        [f"--dataset={tiny_idx(tmp_path)}", "--variant=cifar", "--lrn=tf_cifar10",
         "--init=keras", "--batch_size=32", "--epochs=2", "--steps_per_epoch=3",
         "--eval_steps=1", "--learning_rate=0.01", "--schedule=constant",
         f"--data_service={service.address}", f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(history(str(tmp_path / "run"))) == 2


def test_train_py_trains_through_the_service_with_mirrored_strategy(service, tmp_path):
    result = run_train(
        [f"--dataset={tiny_idx(tmp_path)}", "--variant=cifar", "--lrn=tf_cifar10",
         "--init=keras", "--batch_size=32", "--epochs=2", "--steps_per_epoch=3",
         "--eval_steps=1", "--learning_rate=0.01", "--schedule=constant",
         "--strategy=mirrored", "--cpu_replicas=2", f"--data_service={service.address}",
         f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(history(str(tmp_path / "run"))) == 2


@pytest.mark.parametrize("flags, fragment", [
    (["--data_service=localhost:5050"], "grpc://HOST:PORT"),
    (["--data_service=grpc://localhost:1"], "no tf.data service dispatcher answers"),
    (["--data_service=grpc://localhost:5050", "--strategy=multi_worker"], "multi_worker"),
])
def test_train_py_data_service_mistakes_are_one_line_errors(tmp_path, flags, fragment):
    result = run_train([f"--dataset={tiny_idx(tmp_path)}", "--variant=cifar", *flags,
                        f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300)
    assert_one_line_error(result, "train.py", fragment)


def train_py(tmp_path, service, epochs):
    """train.py on tiny IDX data through the service, started in the background."""
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={tiny_idx(tmp_path)}",
         "--variant=cifar", "--lrn=tf_cifar10", "--init=keras", "--batch_size=16",
         f"--epochs={epochs}", "--steps_per_epoch=8", "--eval_steps=1",
         "--learning_rate=0.01", "--schedule=constant", f"--data_service={service.address}",
         "--backup_every_minutes=0",
         f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def wait_for_epoch(process, epoch):
    """Reads train.py's output until its line for `epoch` (1-based)."""
    for line in process.stdout:
        if line.startswith(f"epoch {epoch}/"):
            return
    pytest.fail(f"train.py ended before epoch {epoch}: {process.stderr.read()[-3000:]}")


def finish(process, timeout=300):
    """train.py's (exit status, stderr) once it ends; killed if it takes longer than `timeout`."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return process.returncode, stderr


def test_training_goes_on_when_a_worker_is_killed(service, tmp_path):
    process = train_py(tmp_path, service, epochs=3)
    wait_for_epoch(process, 1)
    service.kill_server("worker1")  # SIGKILL during the second epoch; its supervisor restarts it
    code, stderr = finish(process)
    assert code == 0, stderr[-3000:]
    assert len(history(str(tmp_path / "run"))) == 3


def test_training_goes_on_when_the_dispatcher_restarts_from_its_journal(service, tmp_path):
    process = train_py(tmp_path, service, epochs=3)
    wait_for_epoch(process, 1)
    service.kill_server("dispatcher")  # restarted from the journal in its work_dir
    code, stderr = finish(process)
    assert code == 0, stderr[-3000:]
    assert len(history(str(tmp_path / "run"))) == 3


def test_an_epoch_with_a_killed_worker_delivers_no_record_twice(service, tmp_path):
    source = one_record_per_class(tmp_path / "photos", classes=40)
    ds, _ = data.make_dataset(source, "train", True, 2, CONFIG, data.Options(
        data_service=service.address))
    labels = []
    for i, (_, y) in enumerate(ds):
        labels += y.numpy().tolist()
        if i == 0:
            service.kill_server("worker0")
    assert len(labels) == len(set(labels))
    assert set(labels) <= set(range(40))
    # The files the killed process held are lost for this epoch only.
    assert sorted(np.concatenate([y.numpy() for _, y in ds]).tolist()) == list(range(40))


def gone(pid):
    """Whether process `pid` has ended (a zombie nobody reaps has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_no_server_outlives_its_supervisor(service):
    """What a failed test's clean-up relies on when it cannot stop the servers: a supervisor
    killed outright takes its server with it, and the ports are free again."""
    for process in service.processes.values():
        process.kill()
        process.wait()
    deadline = time.monotonic() + 30
    while not all(map(gone, service.serving.values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(gone, service.serving.values()))
    for port in service.ports:
        with socket.socket() as s:
            # Binds past TIME_WAIT, not past a listener.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
