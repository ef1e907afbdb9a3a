"""Every command line of the project is absl flags with one error path (alexnet_tf.cli): its help
lists its own flags, and a mistake is one line and exit status 2."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_one_line_error

# Each entry point: how it is started, and flags that only its help lists.
ENTRY_POINTS = {
    "train.py": (["train.py"], ("--dataset", "--variant", "--workdir")),
    "export.py": (["export.py"], ("--export_dir", "--format")),
    "prepare.py": (["prepare.py"], ("--output_dir",)),
    "visualize": (["-m", "alexnet_tf.visualize"], ("--workdir", "--checkpoint", "--count")),
    "data_service": (["-m", "alexnet_tf.data_service"], ("--port", "--dispatcher", "--work_dir")),
}


def run(command, *args):
    return subprocess.run([sys.executable, *command, *args], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_helpfull_lists_the_entry_points_flags_and_absls(entry_point):
    command, own_flags = ENTRY_POINTS[entry_point]
    result = run(command, "--helpfull")
    assert "Traceback" not in result.stderr
    text = result.stdout + result.stderr
    for flag in own_flags:
        assert f"{flag}:" in text, (flag, text[-2000:])
    assert "absl.flags:" in text and "--flagfile:" in text


@pytest.mark.parametrize("entry_point, args, fragment", [
    ("visualize", ["curves"], "--workdir must have a value"),
    ("visualize", ["--workdir=x"], "give one picture to draw"),
    ("visualize", ["curves", "--workdir=x", "--count=0"], "--count=0"),
    ("data_service", ["worker", "--port=5999"], "a worker needs --dispatcher=HOST:PORT"),
    ("data_service", ["dispatcher", "--port=5999", "--dispatcher=h:1"],
     "--dispatcher is not a dispatcher flag"),
    ("data_service", ["supervisor", "--port=5999"], "give the server to run"),
    ("data_service", ["worker", "--port=x", "--dispatcher=h:1"], "--port=x"),
])
def test_mistakes_are_one_line(entry_point, args, fragment):
    assert_one_line_error(run(ENTRY_POINTS[entry_point][0], *args), entry_point, fragment)


def test_exports_help_gives_the_pixel_budget_train_py_defaults_to():
    from alexnet_tf import flag_facts

    result = run(ENTRY_POINTS["export.py"][0], "--helpfull")
    assert f"{flag_facts.MAX_PIXELS:,}" in result.stdout + result.stderr


def _hiding_tensorflow(tmp_path):
    """An environment in which `import tensorflow` (and keras) fails, as on a machine without it."""
    for name in ("tensorflow", "keras"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))


def test_export_py_parses_its_flags_and_answers_help_without_tensorflow(tmp_path):
    from alexnet_tf import flag_facts

    env = _hiding_tensorflow(tmp_path)
    hidden = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True,
                            text=True, env=env)
    assert "no tensorflow here" in hidden.stderr  # the hiding works
    result = subprocess.run([sys.executable, "export.py", "--helpfull"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    text = result.stdout
    assert "--export_dir:" in text and "absl.flags:" in text
    assert f"<{'|'.join(flag_facts.FORMATS)}>" in text
    assert f"<{'|'.join(flag_facts.QUANTIZATIONS)}>" in text
    assert f"(default: '{flag_facts.CALIBRATION_IMAGES}')" in text
    assert f"{flag_facts.MAX_PIXELS:,}" in text
    # A flag mistake is still one line, before TensorFlow would start.
    mistake = subprocess.run([sys.executable, "export.py", "--workdir=w", "--export_dir=e",
                              "--format=pickle"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=60)
    assert_one_line_error(mistake, "export.py", "--format=pickle")
