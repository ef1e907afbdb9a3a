"""A training run's directory (train.py --workdir): the name of every file in it, and the one
way to read what a run recorded (its settings, preprocessing, classes and data).

alexnet_tf.training writes it; alexnet_tf.serving and alexnet_tf.formats (export.py),
alexnet_tf.visualize and a resumed training run read it through `RunDir`'s methods.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time

from absl import logging


class RunDirError(RuntimeError):
    """A file a finished run should hold is missing; one-line message naming it."""


class RunDirInUse(RunDirError):
    """Another live process trains in the run directory; one-line message naming it."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one training run, under `path`:

        config.json                    the run's TrainConfig
        dataset.json                   its source and class names
        preprocessing.json             its PreprocessConfig (a resumed run keeps it)
        checkpoints/{best,last}.keras  the best (validation top-1) and last models
        backup/                        the resume state (alexnet_tf.backup)
        history.csv                    one row of metrics per epoch
        tensorboard/                   TensorBoard logs
        results.json                   the final metrics
        run.lock                       who trains here now (`hold`)
    """

    path: str

    def _file(self, *names):
        return os.path.join(self.path, *names)

    config = property(lambda self: self._file("config.json"))
    dataset_file = property(lambda self: self._file("dataset.json"))
    preprocessing = property(lambda self: self._file("preprocessing.json"))
    checkpoints = property(lambda self: self._file("checkpoints"))
    backup = property(lambda self: self._file("backup"))
    history = property(lambda self: self._file("history.csv"))
    tensorboard = property(lambda self: self._file("tensorboard"))
    results = property(lambda self: self._file("results.json"))
    lock = property(lambda self: self._file("run.lock"))

    def checkpoint(self, which="best"):
        """checkpoints/<which>.keras, which is "best" or "last"."""
        return self._file("checkpoints", f"{which}.keras")

    def worker(self, task_id):
        """Where a worker other than the chief of a multi-worker run writes (Keras 3 does not
        coordinate workers writing one file)."""
        return RunDir(self._file(f"worker_tmp_{task_id}"))

    def create(self, start_over=False):
        """Makes the directories; `start_over` discards the backup, the history and the
        preprocessing (settled again from the new run's settings) first."""
        if start_over:
            shutil.rmtree(self.backup, ignore_errors=True)
            for path in (self.history, self.preprocessing):
                if os.path.exists(path):
                    os.remove(path)
        os.makedirs(self.checkpoints, exist_ok=True)

    def existing(self, path):
        """`path` (one of this run's files) if it exists, else RunDirError naming it."""
        if not os.path.exists(path):
            raise RunDirError(f"{path} not found: is {self.path} a finished training run?")
        return path

    # -- what the run recorded: each file is read here and nowhere else -----------------------

    def train_config(self):
        """The run's TrainConfig (config.json)."""
        from alexnet_tf.train_config import TrainConfig

        return TrainConfig.from_json(self.existing(self.config))

    def preprocess(self):
        """The run's PreprocessConfig (preprocessing.json): the views its model was trained and
        evaluated on."""
        from alexnet_tf.preprocessing import PreprocessConfig

        return PreprocessConfig.from_json(self.existing(self.preprocessing))

    def class_names(self):
        """The names of the run's classes (dataset.json), class id i at index i."""
        with open(self.existing(self.dataset_file)) as f:
            return json.load(f)["class_names"]

    def source(self):
        """The `sources.Source` the run read its data from."""
        from alexnet_tf import inputs

        return inputs.source_of(self.train_config())

    def dataset(self, split, training, batch_size, options, what, preprocess=None):
        """(dataset, skipped-image counter) of one of the run's splits, cut as `preprocess`
        (default: the run's own) says, once the split is known to hold a readable image
        (`scans.check_split`; `what` names the use in its error). `options`: a `data.Options`.
        The uint8 crops of `data.make_dataset`: `data.on_host` finishes them on the host."""
        from alexnet_tf import data, scans

        preprocess = preprocess or self.preprocess()
        source = self.source()
        scans.check_split(source, split, 1, what, preprocess.max_pixels)
        return data.make_dataset(source, split, training, batch_size, preprocess, options)

    @contextlib.contextmanager
    def hold(self):
        """One training process per run directory: holds an exclusive lock on run.lock (the
        kernel frees it when the process ends, kill -9 and crashes included) and writes the
        holder's host, pid and start time in it. RunDirInUse when a live process holds it; a
        lock file left by a process that is gone is taken over, with a log line naming it."""
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        held = False
        try:
            with os.fdopen(os.dup(fd)) as f:
                holder = f.read().strip()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirInUse(
                    f"{self.path} is in use by another training run ({_describe(holder)}); "
                    "wait for it to end or stop it, or give another --workdir") from None
            held = True
            if holder:
                logging.warning("Taking over %s from a run that is no longer running (%s)",
                                self.lock, _describe(holder))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
            yield
        finally:
            if held:
                os.ftruncate(fd, 0)  # an end the process saw itself leaves nobody named
            os.close(fd)  # and with it the lock


def _describe(holder):
    """The holder named in a lock file's text."""
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
    except (ValueError, TypeError, KeyError):
        return "unknown holder"
