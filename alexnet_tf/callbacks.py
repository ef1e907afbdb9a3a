"""The run's own Keras callbacks: the paper's learning-rate drops, the stop at a NaN loss and the
one-line epoch report."""

import math
import time

import keras
import numpy as np
from absl import logging



class DivideOnPlateau(keras.callbacks.Callback):
    """Paper §5: multiply the learning rate by `factor` (the paper divided it by 10: 0.1) when
    validation top-1 stops improving for `patience` epochs.

    At most `max_drops` drops (the paper stopped after three). Its counters (`STATE`) are
    saved with each backup, so that a resumed run continues with them.
    """

    STATE = ("best", "wait", "drops")

    def __init__(self, factor=0.1, patience=3, max_drops=3, monitor="val_top1"):
        super().__init__()
        self.factor, self.patience, self.max_drops = factor, patience, max_drops
        self.monitor = monitor
        self.best, self.wait, self.drops = -math.inf, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        if value > self.best:
            self.best, self.wait = float(value), 0
        else:
            self.wait += 1
            if self.wait >= self.patience and self.drops < self.max_drops:
                lr = float(self.model.optimizer.learning_rate) * self.factor
                self.model.optimizer.learning_rate = lr
                self.drops += 1
                self.wait = 0
                logging.info("Epoch %d: validation top-1 stopped improving; learning rate -> %g "
                             "(drop %d of at most %d)", epoch + 1, lr, self.drops, self.max_drops)


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first NaN/inf loss and remembers the step, so the run can say where."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.first_step = 0  # steps of the next epoch done before this fit (a resumed run)
        self.bad_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.first_step = 0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            batch += self.first_step
            self.bad_step = (self.epoch, batch, self.epoch * self.steps_per_epoch + batch + 1)
            self.model.stop_training = True


class EpochReport(keras.callbacks.Callback):
    """One line per epoch with images/s, the learning rate and skipped images (unreadable, or
    over the pixel budget); adds `learning_rate` and `images_per_sec` to the logs so that
    CSVLogger and TensorBoard record them.

    images/s is the rate of the epoch's steps after its first call from Python: not the
    tracing and XLA compilation of the first, nor validation, nor the callbacks at its end. The
    clock stops after the last call's logs, which Keras reads from the device, so the steps
    are done. An epoch of one call is timed whole.
    """

    def __init__(self, global_batch, steps_per_epoch, epochs, skipped=None, verbose=True,
                 clock=time.perf_counter):
        super().__init__()
        self.verbose = verbose
        self.global_batch, self.steps_per_epoch, self.epochs = global_batch, steps_per_epoch, epochs
        self.skipped = skipped
        self.clock = clock
        self.start = None
        self.timed = None  # (clock at the start of the timed steps, the first timed step)
        self.steps_done_at = None

    def _steps(self):
        """The steps of this fit's epochs (fewer than an epoch's in a run resumed mid-epoch)."""
        return (self.params or {}).get("steps") or self.steps_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.start = self.clock()
        self.timed = (self.start, 0)
        self.steps_done_at = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch and self.timed[1] == 0:
            self.timed = (self.clock(), batch)

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self._steps():
            self.steps_done_at = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        now = self.clock()
        elapsed = now - self.start
        started, first = self.timed
        rate = (self.global_batch * (self._steps() - first)
                / max((self.steps_done_at or now) - started, 1e-9))
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["images_per_sec"] = rate
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "top1", "top5", "val_loss", "val_top1", "val_top5"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4f}")
        parts.append(f"lr {logs['learning_rate']:.3g}")
        parts.append(f"{rate:.0f} img/s")
        parts.append(f"{elapsed:.0f}s")
        if self.skipped is not None:
            skipped = int(self.skipped.numpy())
            logs["skipped_images"] = skipped
            parts.append(f"skipped {skipped} unreadable or oversized images so far")
        if self.verbose:
            print(" - ".join(parts), flush=True)
