"""Crash-safe training state: what a rerun of the same train.py command resumes from.

A run can die at any moment (kill -9, a full disk, a lost machine), including while it writes.
`Backup` writes every file under a name nothing reads yet and makes it current with one atomic
rename, so a rerun finds the last complete state; `keras_compat.AtomicModelCheckpoint` does the
same for the checkpoints export.py reads.
"""

import json
import math
import os
import signal
import threading
import time

import keras
from absl import logging

STATE_FILE = "state.json"


class BackupError(RuntimeError):
    """The resume state cannot be read; one-line message naming the file."""


class Interrupted(Exception):
    """Training stopped at a termination signal, its state backed up: `epoch` (0-based) and
    `step` (steps of that epoch done) say where a rerun continues."""

    def __init__(self, signum, epoch, step):
        self.signum, self.epoch, self.step = signum, epoch, step
        super().__init__(f"stopped at epoch {epoch + 1} step {step} by "
                         f"{signal.Signals(signum).name}; rerun the same command to continue")


class StopSignals:
    """While entered, SIGTERM and SIGINT (a preemptible machine's notice, Ctrl-C) do not end
    the process: they are recorded in `signum` for Backup, which saves at the next step
    boundary and stops the run. A second signal while it saves changes nothing. Outside the
    main thread (where Python cannot install handlers) it does nothing.

    `agree`: with several workers, a function of this worker's signal number (0: none) that
    returns the number of a signal any worker has received (0: none), the same on every worker
    (a collective), so that all stop after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, agree=None):
        self.signum = None
        self.agree = agree
        self._previous = {}

    def requested(self):
        """The signal that stops the run now (0: none); with `agree`, the workers' decision."""
        signum = self.signum or 0
        return self.agree(signum) if self.agree is not None else signum

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _replace_atomically(path, text):
    """Writes `text` to `path` so that a crash leaves either the old file or the new one."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


def _first_sentence(error, limit=80):
    """The start of an error's message, on one line and without the tensor values that Keras'
    loading errors quote."""
    text = " ".join(str(error).split()).split(". ")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Backup(keras.callbacks.Callback):
    """Backs up the resume state: at an epoch's end once the interval has passed since the
    previous backup, and at the last epoch's end; mid-epoch, in an epoch longer than the
    interval, at the first step that far from the previous backup; and every `save_freq` steps
    when given. The interval is `every_seconds`, or less for a state that saves quickly: the
    time of the last save divided by `overhead`, so that backups cost at most that share of
    the run (a small model backs up at every epoch end, the paper model's 0.5 GB every few
    minutes).

    Files in `directory`:
        weights-<n>.weights.h5  the model's and the optimizer's variables at save n
        state.json              the commit point: the epoch and step to resume at, the weights
                                file and the state of the callbacks named in `keep`; also the
                                previous save's, whose weights file is kept as a fallback

    A save writes a new weights file, then replaces state.json by a rename; a crash before the
    rename leaves the previous state whole (the half-written file is removed by the next save).
    A mid-epoch save resumes at its step: `restore` says how many of the epoch's steps are done
    (`resume_step`), and the run trains the rest of that epoch first (training.fit; a fit that
    starts mid-epoch tells this callback with `start_epoch_at`). With `stop` (a StopSignals),
    a termination signal saves at the next step boundary (at an epoch's last step, once the
    epoch has ended) and raises Interrupted. Saves stop at the first non-finite loss, so a
    rerun never resumes from NaN weights.
    Nothing here waits for the device at a step: the time is read before a step, and the loss
    from the logs Keras has already turned into Python floats after it.

    `restore(model)` is called before fit, once the model and its optimizer are built: it loads
    the newest readable state and returns the epoch to resume at.

    Args:
        directory: where the backup lives (one per worker).
        save_freq: "epoch", or also every this many training steps.
        every_seconds: the most time between two backups; 0: at every epoch end.
        overhead: the share of the run that backups may take (None: `every_seconds` alone).
        keep: {name: (callback, [attribute, ...])}: callback attributes saved with each state
            and set again by `restore` (a plateau schedule's counters, the best metric so far).
        history_csv: a CSVLogger file; `restore` drops its rows of the epochs that will run
            again, so that each epoch appears once.
        stop: a StopSignals whose signal stops training at the next step boundary.
    """

    def __init__(self, directory, save_freq="epoch", keep=None, history_csv=None,
                 every_seconds=0.0, overhead=None, clock=time.monotonic, stop=None):
        super().__init__()
        self.directory = directory
        self.save_freq = save_freq
        self.every_seconds = every_seconds
        self.overhead = overhead
        self._save_seconds = 0.0  # how long the last save took
        self.keep = keep or {}
        self.history_csv = history_csv
        self.clock = clock
        self.stop = stop
        self.resume_step = 0  # steps of the resumed epoch done before the backup (restore)
        self._epoch = 0
        self._steps = 0  # steps this run has trained
        self._epoch_start_steps = 0
        self._first_step = 0  # steps of the current epoch done before this fit started it
        self._epoch_step = 0  # steps of the current epoch done
        self._saved_at = self._epoch_began = clock()
        self._state = None  # the state.json now on disk
        self._finite = True

    # -- saving ---------------------------------------------------------------------------------

    def due_at_epoch_end(self, epoch):
        """Whether the end of `epoch` (0-based) saves: the last epoch's always does."""
        last = epoch + 1 == (self.params or {}).get("epochs")
        return last or self.clock() - self._saved_at >= self.interval()

    def interval(self):
        """The time after a backup when the next is due."""
        if self.overhead is None:
            return self.every_seconds
        return min(self.every_seconds, self._save_seconds / self.overhead)

    def start_epoch_at(self, step):
        """The next epoch this callback sees starts with `step` of its steps already done (a
        fit that resumes mid-epoch)."""
        self._first_step = step

    def on_train_begin(self, logs=None):
        self._saved_at = self.clock()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_steps = self._steps
        self._epoch_step = self._first_step
        self._epoch_began = self.clock()

    def on_train_batch_begin(self, batch, logs=None):
        # Mid-epoch only in an epoch longer than the interval: a mid-epoch save resumes at the
        # epoch's start, so in shorter epochs the epoch's end is the better moment.
        now = self.clock()
        interval = self.interval()
        if (interval and batch and now - self._saved_at >= interval
                and now - self._epoch_began >= interval):
            self.save(self._epoch, self._epoch_step)

    def on_train_batch_end(self, batch, logs=None):
        # `batch`: the last step of the call (several with steps_per_execution).
        self._finite = self._finite and math.isfinite(float((logs or {}).get("loss", 0.0)))
        before, self._steps = self._steps, self._epoch_start_steps + batch + 1
        self._epoch_step = self._first_step + batch + 1
        # The epoch's last step is saved by on_epoch_end, which comes next.
        if batch + 1 == (self.params or {}).get("steps"):
            return
        signum = self.stop.requested() if self.stop is not None else 0
        if signum:
            self.save(self._epoch, self._epoch_step)
            raise Interrupted(signum, self._epoch, self._epoch_step)
        if self.save_freq != "epoch" and self._steps // self.save_freq > before // self.save_freq:
            self.save(self._epoch, self._epoch_step)

    def on_epoch_end(self, epoch, logs=None):
        self._first_step = 0
        signum = self.stop.requested() if self.stop is not None else 0
        if signum or self.due_at_epoch_end(epoch):
            self.save(epoch + 1)
        if signum and epoch + 1 < (self.params or {}).get("epochs", 0):
            raise Interrupted(signum, epoch + 1, 0)

    def save(self, resume_epoch, step=0):
        """Commits the state that resumes at `resume_epoch` (0-based), `step` of its steps
        done."""
        if not self._finite:
            return
        started = self.clock()
        os.makedirs(self.directory, exist_ok=True)
        serial = (self._state or {}).get("serial", 0) + 1
        weights = f"weights-{serial}.weights.h5"
        self.model.save_weights(os.path.join(self.directory, weights))
        state = {
            "serial": serial,
            "epoch": resume_epoch,
            "step": step,
            "weights": weights,
            "callbacks": {name: {attribute: getattr(callback, attribute)
                                 for attribute in attributes}
                          for name, (callback, attributes) in self.keep.items()},
        }
        previous = dict(self._state or {})
        previous.pop("previous", None)
        state["previous"] = previous or None
        _replace_atomically(os.path.join(self.directory, STATE_FILE), json.dumps(state))
        self._state = state
        self._saved_at = self.clock()
        self._save_seconds = self._saved_at - started
        self._remove_unreferenced()

    def _remove_unreferenced(self):
        referenced = {STATE_FILE, self._state["weights"]}
        if self._state["previous"]:
            referenced.add(self._state["previous"]["weights"])
        for name in os.listdir(self.directory):
            if name not in referenced:
                os.remove(os.path.join(self.directory, name))

    # -- restoring ------------------------------------------------------------------------------

    def exists(self):
        return os.path.exists(os.path.join(self.directory, STATE_FILE))

    def restore(self, model):
        """Loads the newest readable state into `model` (built, with its optimizer) and the kept
        callbacks; returns the epoch to resume at (0 when there is no backup), and sets
        `resume_step` to the steps of that epoch already done. Raises BackupError when nothing
        in the backup can be read."""
        self.set_model(model)
        path = os.path.join(self.directory, STATE_FILE)
        if not os.path.exists(path):
            self._drop_history_from(0)  # a run that died before its first backup
            return 0
        try:
            with open(path) as f:
                newest = json.load(f)
        except (OSError, ValueError) as e:
            raise BackupError(f"cannot resume: {path} is unreadable ({e})") from None
        failed, cause = [], None
        for state in (newest, newest.get("previous")):
            if not state:
                continue
            weights = os.path.join(self.directory, state["weights"])
            try:
                self.model.load_weights(weights)
            except (OSError, ValueError, KeyError) as e:  # h5py: OSError; Keras: the others
                failed.append(state["weights"])
                cause = cause or _first_sentence(e)
                logging.warning("%s does not load (%s); trying the previous backup", weights,
                                _first_sentence(e))
                continue
            if state is not newest:
                logging.warning("Resuming from the previous backup (epoch %d)", state["epoch"] + 1)
            self.resume_step = state.get("step", 0)
            for name, values in state["callbacks"].items():
                callback, _ = self.keep[name]
                for attribute, value in values.items():
                    setattr(callback, attribute, value)
            self._state = dict(state, previous=None)
            self._drop_history_from(state["epoch"])
            return state["epoch"]
        also = f", and so is {failed[1]}" if len(failed) > 1 else ""
        raise BackupError(f"cannot resume from {self.directory}: {failed[0]} is unreadable "
                          f"({cause}){also}")

    def _drop_history_from(self, epoch):
        """Removes the history rows of epochs >= `epoch` (written before a crash that came
        before their backup), keeping the header."""
        if not self.history_csv or not os.path.exists(self.history_csv):
            return
        with open(self.history_csv) as f:
            lines = f.readlines()
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < epoch]
        if kept != lines:
            _replace_atomically(self.history_csv, "".join(kept))
