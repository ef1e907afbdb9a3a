"""The resume state: atomic saves, fallback to the previous save, history without repeats."""

import json
import os
import signal

import keras
import numpy as np
import pytest

from alexnet_tf import backup as backup_lib
from alexnet_tf import keras_compat


class Counter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.best, self.seen = -np.inf, 0


def small_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    return model


def train_steps(model, steps):
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    for _ in range(steps):
        model.train_on_batch(x, np.ones((4, 2), np.float32))


def fresh(directory, history_csv=None):
    """A new model and Backup, as a rerun of train.py builds them."""
    counter = Counter()
    model = small_model()
    model.optimizer.build(model.trainable_variables)
    backup = backup_lib.Backup(str(directory), keep={"counter": (counter, ["best", "seen"])},
                               history_csv=history_csv)
    return model, backup, counter


def save_epochs(directory, epochs, history_csv=None):
    """Trains and backs up `epochs` epochs of 2 steps; the weights after each, by epoch."""
    model, backup, counter = fresh(directory, history_csv)
    backup.set_model(model)
    weights = {}
    for epoch in range(epochs):
        train_steps(model, 2)
        counter.best, counter.seen = 0.1 * epoch, epoch
        backup.on_epoch_end(epoch)
        weights[epoch + 1] = [w.copy() for w in model.get_weights()]
    return weights


def test_restore_brings_back_weights_optimizer_epoch_and_callback_state(tmp_path):
    weights = save_epochs(tmp_path, 3)
    model, backup, counter = fresh(tmp_path)
    assert backup.restore(model) == 3
    for restored, saved in zip(model.get_weights(), weights[3]):
        np.testing.assert_array_equal(restored, saved)
    assert int(model.optimizer.iterations) == 6  # momentum and step count came back too
    assert (counter.best, counter.seen) == (pytest.approx(0.2), 2)
    # Only the newest save and the one before it are kept.
    assert sorted(os.listdir(tmp_path)) == ["state.json", "weights-2.weights.h5",
                                            "weights-3.weights.h5"]


def test_no_backup_resumes_at_epoch_zero_without_the_history_of_a_run_that_died(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n0,1.5\n")  # epoch 0 ended, the run died before its backup
    model, backup, _ = fresh(tmp_path / "none", str(history))
    assert not backup.exists() and backup.restore(model) == 0
    assert history.read_text() == "epoch,loss\n"


def test_an_unreadable_newest_save_falls_back_to_the_previous(tmp_path):
    weights = save_epochs(tmp_path, 3)
    newest = tmp_path / "weights-3.weights.h5"
    newest.write_bytes(newest.read_bytes()[:1000])  # what a disk error leaves
    model, backup, counter = fresh(tmp_path)
    assert backup.restore(model) == 2
    for restored, saved in zip(model.get_weights(), weights[2]):
        np.testing.assert_array_equal(restored, saved)
    assert counter.seen == 1


def test_nothing_readable_is_one_error_naming_the_files(tmp_path):
    save_epochs(tmp_path, 2)
    for name in ("weights-1.weights.h5", "weights-2.weights.h5"):
        (tmp_path / name).write_bytes(b"")
    model, backup, _ = fresh(tmp_path)
    with pytest.raises(backup_lib.BackupError, match="weights-2.weights.h5 is unreadable") as e:
        backup.restore(model)
    assert "weights-1.weights.h5" in str(e.value) and "\n" not in str(e.value)


def test_a_crash_during_a_save_leaves_the_last_complete_state(tmp_path, monkeypatch):
    weights = save_epochs(tmp_path, 2)
    model, backup, _ = fresh(tmp_path)
    backup.restore(model)
    backup.set_model(model)
    train_steps(model, 2)

    def crash(*args):
        raise KeyboardInterrupt("killed between the weights file and the commit")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        backup.on_epoch_end(2)
    monkeypatch.undo()
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 2
    model, backup, _ = fresh(tmp_path)
    assert backup.restore(model) == 2
    for restored, saved in zip(model.get_weights(), weights[2]):
        np.testing.assert_array_equal(restored, saved)


def test_mid_epoch_saves_resume_at_their_step(tmp_path):
    model, backup, _ = fresh(tmp_path)
    backup.save_freq = 3
    backup.set_model(model)
    backup.on_epoch_begin(4)
    for batch in range(7):
        backup.on_train_batch_end(batch, {"loss": 1.0})
    assert json.loads((tmp_path / "state.json").read_text())["serial"] == 2  # after 3 and 6
    model, backup, _ = fresh(tmp_path)
    assert backup.restore(model) == 4 and backup.resume_step == 6


def test_an_epoch_resumed_mid_way_counts_its_steps_from_the_resume(tmp_path):
    model, backup, _ = fresh(tmp_path)
    backup.save_freq = 2
    backup.set_model(model)
    backup.set_params({"steps": 4, "epochs": 3})  # the 4 steps left of a 10-step epoch
    backup.start_epoch_at(6)
    backup.on_epoch_begin(1)
    backup.on_train_batch_end(0, {"loss": 1.0})
    backup.on_train_batch_end(1, {"loss": 1.0})
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 8)
    backup.on_epoch_end(1)
    backup.on_epoch_begin(2)  # the next epoch starts at its first step
    backup.on_train_batch_end(1, {"loss": 1.0})
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (2, 2)


class _SignalAfter(keras.callbacks.Callback):
    """Sends this process `signum` once `calls` calls have ended (a preemption notice)."""

    def __init__(self, calls, signum):
        super().__init__()
        self.calls, self.signum = calls, signum

    def on_train_batch_end(self, batch, logs=None):
        self.calls -= 1
        if self.calls == 0:
            os.kill(os.getpid(), self.signum)


def _fit_until_a_signal(model, backup, calls, signum=signal.SIGTERM, epochs=3):
    """Fits `model` (fresh's, 8 steps per epoch) for `epochs` epochs with `backup` under
    StopSignals, `signum` sent after `calls` steps; the Interrupted the fit ended with."""
    x = np.arange(48, dtype=np.float32).reshape(16, 3) / 50
    with backup_lib.StopSignals() as stop:
        backup.stop = stop
        with pytest.raises(backup_lib.Interrupted) as e:
            model.fit(x, np.ones((16, 2), np.float32), batch_size=2, epochs=epochs, verbose=0,
                      callbacks=[_SignalAfter(calls, signum), backup])
    return e.value


@pytest.mark.onednn
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_next_step_and_stops(tmp_path, signum):
    model, backup, _ = fresh(tmp_path)
    stopped = _fit_until_a_signal(model, backup, 11, signum)
    # 8 steps per epoch: the signal came after the 11th step, the 3rd of the 2nd epoch.
    assert (stopped.epoch, stopped.step, stopped.signum) == (1, 3, signum)
    assert str(stopped).startswith("stopped at epoch 2 step 3 by ")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    saved = [w.copy() for w in model.get_weights()]
    model, backup, _ = fresh(tmp_path)
    assert backup.restore(model) == 1 and backup.resume_step == 3
    assert int(model.optimizer.iterations) == 11
    for restored, weights in zip(model.get_weights(), saved):
        np.testing.assert_array_equal(restored, weights)


@pytest.mark.onednn
def test_a_signal_at_an_epochs_last_step_stops_once_the_epoch_has_ended(tmp_path):
    model, backup, _ = fresh(tmp_path)
    stopped = _fit_until_a_signal(model, backup, 8)
    assert (stopped.epoch, stopped.step) == (1, 0)
    model, backup, _ = fresh(tmp_path)
    assert backup.restore(model) == 1 and backup.resume_step == 0


@pytest.mark.onednn
def test_a_second_signal_while_saving_leaves_a_whole_backup(tmp_path, monkeypatch):
    model, backup, _ = fresh(tmp_path)
    save_weights = model.save_weights

    def save_with_another_signal(path):  # the notice repeated while the weights are written
        os.kill(os.getpid(), signal.SIGTERM)
        save_weights(path)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(model, "save_weights", save_with_another_signal)
    stopped = _fit_until_a_signal(model, backup, 3, epochs=2)
    assert (stopped.epoch, stopped.step, stopped.signum) == (0, 3, signal.SIGTERM)
    model, backup, _ = fresh(tmp_path)
    assert backup.restore(model) == 0 and backup.resume_step == 3
    assert int(model.optimizer.iterations) == 3


def test_an_epochs_last_step_is_saved_once_by_the_epoch_end(tmp_path):
    model, backup, _ = fresh(tmp_path)
    backup.save_freq = 3
    backup.set_model(model)
    backup.set_params({"steps": 6})
    backup.on_epoch_begin(0)
    for batch in range(6):
        backup.on_train_batch_end(batch, {"loss": 1.0})
    backup.on_epoch_end(0)
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["serial"], state["epoch"]) == (2, 1)  # after step 3, then the epoch's end
    assert state["previous"]["epoch"] == 0


def test_no_save_after_a_non_finite_loss(tmp_path):
    model, backup, _ = fresh(tmp_path)
    backup.set_model(model)
    backup.on_train_batch_end(0, {"loss": float("nan")})
    backup.on_epoch_end(0)
    assert not backup.exists()


def test_history_rows_of_epochs_run_again_are_dropped(tmp_path):
    history = tmp_path / "history.csv"
    save_epochs(tmp_path / "backup", 2, str(history))
    # Epoch 2's row was written, then the run died before its backup.
    history.write_text("epoch,loss\n0,1.5\n1,1.2\n2,1.1\n")
    model, backup, _ = fresh(tmp_path / "backup", str(history))
    assert backup.restore(model) == 2
    assert history.read_text() == "epoch,loss\n0,1.5\n1,1.2\n"


def test_model_checkpoint_is_replaced_only_by_a_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "best.keras"
    model = small_model()
    train_steps(model, 1)
    checkpoint = keras_compat.AtomicModelCheckpoint(str(path), monitor="val_top1", mode="max",
                                                  save_best_only=True)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_top1": 0.5})
    first = path.read_bytes()
    assert os.listdir(tmp_path) == ["best.keras"]
    # A crash while the better model is written: the old file stays whole.
    monkeypatch.setattr(model, "save", lambda *a, **k: open(a[0], "wb").write(b"half"))
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.on_epoch_end(1, {"val_top1": 0.9})
    monkeypatch.undo()
    assert path.read_bytes() == first
    keras.models.load_model(path)
    # The next save clears the half-written file; no improvement writes nothing.
    checkpoint.on_epoch_end(2, {"val_top1": 0.1})
    assert path.read_bytes() == first and os.listdir(tmp_path) == ["best.keras"]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def saves_so_far(backup):
    """How many saves have committed: the serial number of the state.json on disk."""
    path = os.path.join(backup.directory, backup_lib.STATE_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return json.load(f)["serial"]


def test_backups_follow_the_clock_and_the_last_epoch_always_saves(tmp_path):
    clock = Clock()
    model = small_model()
    backup = backup_lib.Backup(str(tmp_path / "backup"), every_seconds=60, clock=clock)
    # (No `overhead`: the time rule alone; the test below adds the save's cost.)
    backup.set_model(model)
    backup.set_params({"epochs": 5, "steps": 4})
    last = keras_compat.AtomicModelCheckpoint(str(tmp_path / "last.keras"),
                                            when=backup.due_at_epoch_end)
    last.set_model(model)
    backup.on_train_begin()
    saved = []  # (epoch, step) of each save: step None for an epoch's end
    for epoch in range(5):  # epochs of 25 s, then one of 100 s (its steps 25 s apart)
        backup.on_epoch_begin(epoch)
        for step in range(4):
            backup.on_train_batch_begin(step)
            if saves_so_far(backup) > len(saved):
                saved.append((epoch, step))
            clock.now += 25 if epoch == 3 else 25 / 4
            backup.on_train_batch_end(step, {"loss": 1.0})
        serial = saves_so_far(backup)
        had_last = (tmp_path / "last.keras").exists() and os.path.getmtime(tmp_path / "last.keras")
        last.on_epoch_end(epoch, {})
        backup.on_epoch_end(epoch)
        if saves_so_far(backup) > serial:
            saved.append((epoch, None))
            assert (tmp_path / "last.keras").exists()
        else:
            assert not (tmp_path / "last.keras").exists() or had_last
    # 25 s epochs: the third ends 75 s in (>= 60); the fourth is 100 s long: a save at its
    # third step (60 s after the last), none at its end (40 s later); the last epoch always.
    assert saved == [(2, None), (3, 3), (4, None)]
    state = json.loads((tmp_path / "backup" / "state.json").read_text())
    assert state["epoch"] == 5


def test_a_zero_interval_saves_every_epoch_end(tmp_path):
    model = small_model()
    backup = backup_lib.Backup(str(tmp_path), every_seconds=0, clock=Clock())
    backup.set_model(model)
    backup.set_params({"epochs": 3, "steps": 2})
    for epoch in range(3):
        backup.on_epoch_begin(epoch)
        backup.on_train_batch_begin(1)  # no mid-epoch save without an interval
        backup.on_epoch_end(epoch)
        assert json.loads((tmp_path / "state.json").read_text())["serial"] == epoch + 1


def test_a_state_that_saves_quickly_is_backed_up_sooner(tmp_path):
    # Each save takes 2 s of the clock; with 1% for backups a save is due 200 s after the last
    # (every epoch end here: epochs of 250 s), under the 600 s of every_seconds. Saves of 10 s
    # wait the 600 s.
    for save_seconds, expected in [(2.0, [0, 1, 2, 3, 4, 5]), (10.0, [0, 3, 5])]:
        clock = Clock()
        model = small_model()
        directory = tmp_path / str(save_seconds)
        backup = backup_lib.Backup(str(directory), every_seconds=600, overhead=0.01,
                                   clock=clock)
        backup.set_model(model)
        backup.set_params({"epochs": 6, "steps": 1})
        original = model.save_weights

        def slow_save(path, seconds=save_seconds, original=original):
            clock.now += seconds
            original(path)

        model.save_weights = slow_save
        backup.on_train_begin()
        saved = []
        for epoch in range(6):
            backup.on_epoch_begin(epoch)
            clock.now += 250
            serial = saves_so_far(backup)
            backup.on_epoch_end(epoch)
            if saves_so_far(backup) > serial:
                saved.append(epoch)
        assert saved == expected, save_seconds
