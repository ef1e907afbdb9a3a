"""Shared test set-up: quiet TensorFlow logs and a fixed seed per test."""

import os
import shutil
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The workdir of one finished one-epoch run of the small model, trained once per session and
    shared by the tests that export, draw or fine-tune from a run (they add files to it, never
    change the run's own)."""
    from alexnet_tf import training
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("tiny_run")
    workdir = str(root / "run")
    training.train_and_evaluate(tiny_config(root), workdir)
    return workdir


def _mount_tmpfs(mount_point, size):
    """Mounts a tmpfs of `size` at mount_point; skips the test, saying why, where this process may
    not mount one."""
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 1 MiB tmpfs: writing more than that fails with "No space left on
    device"."""
    mount_point = tmp_path / "small_disk"
    _mount_tmpfs(mount_point, "1m")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.fixture
def read_only_run(tiny_run, tmp_path):
    """A copy of `tiny_run` on a read-only filesystem (permissions would not stop root)."""
    mount_point = tmp_path / "read_only"
    _mount_tmpfs(mount_point, "64m")
    try:
        shutil.copytree(tiny_run, mount_point / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield mount_point / "run"
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.fixture(scope="session")
def hostile_images(tmp_path_factory):
    """Paths of images a server must survive, written once per session: `png_bomb` and
    `jpeg_bomb` declare 20000 x 20000 pixels (a PNG of ~0.4 MB that decodes to 1.2 GB of RGB, a
    JPEG header patched to that size), `photo` is a 12-megapixel (4000 x 3000) photograph and
    `small` a 300 x 240 JPEG."""
    from tests.helpers import encode, jpeg_bomb, photo_jpeg, png_bomb, smooth_image

    directory = tmp_path_factory.mktemp("hostile_images")
    contents = {"png_bomb.png": png_bomb(20000, 20000), "jpeg_bomb.jpg": jpeg_bomb(20000, 20000),
                "photo.jpg": photo_jpeg(3000, 4000),
                "small.jpg": encode(smooth_image(300, 240), "jpeg")}
    paths = {}
    for name, content in contents.items():
        (directory / name).write_bytes(content)
        paths[name.split(".")[0]] = str(directory / name)
    return paths
