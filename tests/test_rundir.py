"""A finished run is read through RunDir alone: its settings and its preprocessing each come from
one function, whoever reads them (a resumed run, export, int8 calibration, the pictures)."""

import builtins
import collections
import json
import os
import sys

import pytest
import tensorflow as tf

from alexnet_tf import formats, serving, training, visualize
from alexnet_tf.rundir import RunDir
from alexnet_tf.train_config import TrainConfig, TrainingError
from tests.helpers import tiny_config

RECORDED = ("config.json", "preprocessing.json")


@pytest.fixture
def readers(monkeypatch):
    """{(file name, stage): {the functions that opened it for reading}}; set `stage[0]` to name
    what runs."""
    seen = collections.defaultdict(set)
    stage = ["train"]

    def recording(opener):
        def opened(path, mode="r", *args, **kwargs):
            name = os.path.basename(str(path))
            if name in RECORDED and "r" in mode:
                seen[name, stage[0]].add(sys._getframe(1).f_code.co_qualname)
            return opener(path, mode, *args, **kwargs)
        return opened

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(tf.io.gfile, "GFile", recording(tf.io.gfile.GFile))
    return seen, stage


def test_config_and_preprocessing_are_each_read_by_one_function(tmp_path, readers):
    seen, stage = readers
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(tiny_config(tmp_path), workdir)
    stage[0] = "resume"
    training.train_and_evaluate(tiny_config(tmp_path, epochs=2), workdir)
    stage[0] = "export"
    model, class_names, pre = serving.load_run(workdir, "last")
    serving.export_saved_model(model, str(tmp_path / "export"), class_names, pre)
    stage[0] = "calibration"
    assert formats.calibration_images(workdir, pre, count=4).shape == (4, 28, 28, 1)
    stage[0] = "pictures"
    visualize.draw("augmentations", workdir, str(tmp_path / "grid.png"), count=4)

    # Every reader reads what it needs...
    assert {("config.json", "resume"), ("preprocessing.json", "resume"),
            ("preprocessing.json", "export"), ("config.json", "calibration"),
            ("config.json", "pictures"), ("preprocessing.json", "pictures")} <= set(seen)
    # ...through the one function that reads each file.
    by_file = collections.defaultdict(set)
    for (name, _), functions in seen.items():
        by_file[name] |= functions
    assert by_file == {"config.json": {"TrainConfig.from_json"},
                       "preprocessing.json": {"PreprocessConfig.from_json"}}


def test_a_saved_config_reads_back_equal_and_tolerates_other_versions(tmp_path):
    config = tiny_config(tmp_path, epochs=3, learning_rate=0.05)
    path = str(tmp_path / "config.json")
    config.to_json(path)
    assert TrainConfig.from_json(path) == config
    with open(path) as f:
        saved = json.load(f)
    del saved["learning_rate"]  # a setting an older version did not write: its default
    saved["a_future_setting"] = 1  # one a newer version wrote: left out
    with open(path, "w") as f:
        json.dump(saved, f)
    read = TrainConfig.from_json(path)
    assert read.learning_rate == TrainConfig().learning_rate and read.epochs == 3


def test_a_resume_over_an_unreadable_config_is_one_line(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path)
    with open(run.config, "w") as f:
        f.write("[1, 2]")
    with pytest.raises(TrainingError, match=r"cannot resume: .*config.json is unreadable"):
        training.check_resumable(tiny_config(tmp_path), run)
