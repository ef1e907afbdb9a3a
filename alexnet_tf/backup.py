"""Crash-safe training state: what a rerun of the same train.py command resumes from.

A run can die at any moment (kill -9, a full disk, a lost machine), including while it writes.
`Backup` writes every file under a name nothing reads yet and makes it current with one atomic
rename, so a rerun finds the last complete state; `keras_compat.AtomicModelCheckpoint` does the
same for the checkpoints export.py reads.
"""

import json
import math
import os
import time

import keras
from absl import logging

STATE_FILE = "state.json"


class BackupError(RuntimeError):
    """The resume state cannot be read; one-line message naming the file."""


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
        state.json              the commit point: the epoch to resume at, the weights file and
                                the state of the callbacks named in `keep`; also the previous
                                save's, whose weights file is kept as a fallback

    A save writes a new weights file, then replaces state.json by a rename; a crash before the
    rename leaves the previous state whole (the half-written file is removed by the next save).
    A mid-epoch save resumes at the start of that epoch, as keras.callbacks.BackupAndRestore
    does. Saves stop at the first non-finite loss, so a rerun never resumes from NaN weights.
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
    """

    def __init__(self, directory, save_freq="epoch", keep=None, history_csv=None,
                 every_seconds=0.0, overhead=None, clock=time.monotonic):
        super().__init__()
        self.directory = directory
        self.save_freq = save_freq
        self.every_seconds = every_seconds
        self.overhead = overhead
        self._save_seconds = 0.0  # how long the last save took
        self.keep = keep or {}
        self.history_csv = history_csv
        self.clock = clock
        self._epoch = 0
        self._steps = 0  # steps this run has trained
        self._epoch_start_steps = 0
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

    def on_train_begin(self, logs=None):
        self._saved_at = self.clock()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_steps = self._steps
        self._epoch_began = self.clock()

    def on_train_batch_begin(self, batch, logs=None):
        # Mid-epoch only in an epoch longer than the interval: a mid-epoch save resumes at the
        # epoch's start, so in shorter epochs the epoch's end is the better moment.
        now = self.clock()
        interval = self.interval()
        if (interval and batch and now - self._saved_at >= interval
                and now - self._epoch_began >= interval):
            self.save(self._epoch)

    def on_train_batch_end(self, batch, logs=None):
        # `batch`: the last step of the call (several with steps_per_execution).
        self._finite = self._finite and math.isfinite(float((logs or {}).get("loss", 0.0)))
        before, self._steps = self._steps, self._epoch_start_steps + batch + 1
        # The epoch's last step is saved by on_epoch_end, which comes next.
        last_step = batch + 1 == (self.params or {}).get("steps")
        if (self.save_freq != "epoch" and self._steps // self.save_freq > before // self.save_freq
                and not last_step):
            self.save(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.due_at_epoch_end(epoch):
            self.save(epoch + 1)

    def save(self, resume_epoch):
        """Commits the state that resumes at `resume_epoch` (0-based)."""
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
        callbacks; returns the epoch to resume at (0 when there is no backup). Raises
        BackupError when nothing in the backup can be read."""
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
