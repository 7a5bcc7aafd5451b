"""Bad inputs: exit code 2, one line naming the problem, no outputs left behind."""
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT


def _image(array, vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    return image


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = rng.random((12, 14, 16)).astype(np.float32)
    files = {"good": good}
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    files["nan"] = nan
    files["constant"] = np.full((12, 14, 16), 7.0, np.float32)
    files["empty"] = np.zeros((12, 14, 16), np.float32)
    files["flat2d"] = good[0]
    paths = {}
    for name, array in files.items():
        paths[name] = str(folder / (name + ".mha"))  # MetaImage keeps NaN (NIfTI writing drops it)
        sitk.WriteImage(_image(array), paths[name])
    assert np.isnan(sitk.GetArrayViewFromImage(sitk.ReadImage(paths["nan"]))).any()
    paths["vector"] = str(folder / "vector.nii.gz")
    sitk.WriteImage(_image(rng.random((12, 14, 16, 3)).astype(np.float32), vector=True), paths["vector"])
    paths["4d"] = str(folder / "4d.nii.gz")
    sitk.WriteImage(sitk.JoinSeries([_image(good), _image(good)]), paths["4d"])
    paths["weights"] = str(folder / "weights.pt")
    with open(paths["weights"], "wb") as handle:
        handle.write(b"this is not a weights file")
    paths["text"] = str(folder / "notanimage.nii.gz")
    with open(paths["text"], "w") as handle:
        handle.write("hello")
    paths["missing"] = str(folder / "does_not_exist.nii.gz")
    return paths


CASES = [
    ("missing", "moving", "not found"),
    ("text", "moving", "cannot read"),
    ("flat2d", "moving", "2D"),
    ("4d", "moving", "4D"),
    ("vector", "moving", "vector image"),
    ("nan", "moving", "NaN"),
    ("constant", "fixed", "constant"),
    ("empty", "moving", "constant"),
]


@pytest.mark.parametrize("name,role,message", CASES)
def test_bad_image_exits_2_with_one_line_and_no_outputs(bad_files, tmp_path, name, role, message):
    out = tmp_path / "out"
    fixed = bad_files[name] if role == "fixed" else bad_files["good"]
    moving = bad_files[name] if role == "moving" else bad_files["good"]
    done = subprocess.run([sys.executable, "-m", "fmsam.cli", "register", fixed, moving,
                           "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "Logic")))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmsam: error:") and message in lines[0], lines
    assert not out.exists()


def test_unreadable_weights(bad_files, tmp_path):
    from fmsam.cli import main

    out = tmp_path / "out"
    code = main(["register", bad_files["good"], bad_files["good"], "--out", str(out),
                 "--weights", bad_files["weights"], "--device", "cpu"])
    assert code == 2 and not out.exists()


def test_corrupt_weights_fail_their_checksum(tmp_path):
    import shutil

    from fmsam.errors import InputError
    from fmsam.weights import bundled_weights, load_model, sha256_of

    path, _ = bundled_weights()
    copy = str(tmp_path / "copy.pt")
    shutil.copy(path, copy)
    with open(copy + ".sha256", "w") as handle:
        handle.write(sha256_of(path))
    load_model(copy)  # intact copy with its checksum loads
    with open(copy, "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(InputError, match="SHA-256"):
        load_model(copy)


def test_bundled_model_loaded_in_the_background_reports_its_errors(sample_paths, tmp_path, monkeypatch):
    """register() reads the bundled model's options from the manifest and loads PyTorch and the
    weights in a thread; the manifest must say what the file holds, and a failed load in that
    thread reaches the caller as the usual error."""
    import json
    import shutil

    import fmsam
    import fmsam.weights as weights
    from fmsam.errors import InputError

    assert weights.bundled_config() == weights.load_model()[1]
    path, _ = weights.bundled_weights()
    shutil.copy(path, tmp_path / os.path.basename(path))
    manifest = json.load(open(weights.MANIFEST))
    manifest["sha256"] = "0" * 64
    json.dump(manifest, open(tmp_path / "manifest.json", "w"))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "MANIFEST", str(tmp_path / "manifest.json"))
    with pytest.raises(InputError, match="SHA-256"):
        fmsam.register(sample_paths["fixed"], sample_paths["moving"], device="cpu")


def test_user_files_are_not_modified(registered_sample, sample_paths, input_digests_before):
    """A registration only reads its inputs: their bytes are unchanged afterwards."""
    from conftest import file_digests

    assert file_digests(sample_paths) == input_digests_before
