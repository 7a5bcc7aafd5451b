"""Bad inputs: exit code 2, one line naming the problem, no outputs left behind."""
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from fmsam.errors import InputError

from conftest import ROOT


def _image(array, vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    return image


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = rng.random(SHAPE).astype(np.float32)
    files = {"good": good}
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    files["nan"] = nan
    infinite = good.copy()
    infinite[1, 2, 3] = -np.inf
    files["constant"] = np.full(SHAPE, 7.0, np.float32)
    files["empty"] = np.zeros(SHAPE, np.float32)
    files["flat2d"] = good[0]
    files["tiny"] = good[:5, :5, :5]
    files["one_slice"] = good[:1]
    paths = {}
    for name, array in files.items():
        paths[name] = str(folder / (name + ".mha"))
        sitk.WriteImage(_image(array), paths[name])
    assert np.isnan(sitk.GetArrayViewFromImage(sitk.ReadImage(paths["nan"]))).any()
    # SimpleITK writes NaN and Inf into NIfTI files, but ITK's NIfTI reader returns them as 0: the
    # file must be checked, not what the reader gives.
    paths["nan_nifti"] = str(folder / "nan.nii.gz")
    sitk.WriteImage(_image(nan), paths["nan_nifti"])
    paths["inf_nifti"] = str(folder / "inf.nii")
    sitk.WriteImage(_image(infinite), paths["inf_nifti"])
    for name in ("nan_nifti", "inf_nifti"):
        assert np.isfinite(sitk.GetArrayViewFromImage(sitk.ReadImage(paths[name]))).all()
    for name, field, value in (("sheared", "TransformMatrix", "1 0.3 0 0 1 0 0 0 1"),
                               ("singular", "TransformMatrix", "1 0 0 0 1 0 0 0 0"),
                               ("spacing_zero", "ElementSpacing", "0 1 1"),
                               ("spacing_negative", "ElementSpacing", "1 -2 1"),
                               ("spacing_huge", "ElementSpacing", "1 1 1e30")):
        # SimpleITK refuses to build such images, so the MetaImage header is edited.
        header = open(paths["good"], "rb").read()
        identity = {"TransformMatrix": "1 0 0 0 1 0 0 0 1", "ElementSpacing": "1 1 1"}[field]
        assert ("%s = %s" % (field, identity)).encode() in header
        paths[name] = str(folder / (name + ".mha"))
        with open(paths[name], "wb") as handle:
            handle.write(header.replace(("%s = %s" % (field, identity)).encode(),
                                        ("%s = %s" % (field, value)).encode()))
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


SHAPE = (16, 18, 20)  # above the minimum size (4096 voxels, 16 along two axes)

CASES = [
    ("missing", "moving", "not found"),
    ("text", "moving", "cannot read"),
    ("flat2d", "moving", "2D"),
    ("4d", "moving", "4D"),
    ("vector", "moving", "vector image"),
    ("nan", "moving", "NaN"),
    ("nan_nifti", "moving", "NaN or infinite values (1 voxels"),
    ("inf_nifti", "fixed", "NaN or infinite values (1 voxels"),
    ("constant", "fixed", "constant"),
    ("empty", "moving", "constant"),
    ("tiny", "fixed", "has 5x5x5 voxels (125 in all); registration needs at least 2"),
    ("one_slice", "moving", "has 20x18x1 voxels"),
    ("sheared", "moving", "direction matrix that is not orthonormal (1 0 0 / 0.3 1 0 / 0 0 1)"),
    ("singular", "fixed", "direction matrix that is singular (1 0 0 / 0 1 0 / 0 0 0)"),
    ("spacing_zero", "moving", "voxel spacing 0x1x1 mm; each spacing must be positive and at most"),
    ("spacing_negative", "fixed", "voxel spacing 1x-2x1 mm"),
    ("spacing_huge", "moving", "voxel spacing 1x1x1e+30 mm"),
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
    if name != "missing" and name != "text":
        assert bad_files[name] in lines[0]  # the message names the file
    assert not out.exists()


def test_unreadable_weights(bad_files, tmp_path, capsys):
    from fmsam.weights import sha256_of

    out = tmp_path / "out"
    with open(bad_files["weights"] + ".sha256", "w") as handle:  # verified, but not weights
        handle.write(sha256_of(bad_files["weights"]))
    code, lines = _cli(["register", bad_files["good"], bad_files["good"], "--out", str(out),
                        "--weights", bad_files["weights"], "--device", "cpu"], capsys)
    _assert_one_line_error(code, lines, "unreadable weights file " + bad_files["weights"])
    assert not out.exists()


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


def _cli(argv, capsys):
    """``(exit code, stderr lines)`` of the fmsam command run in this process."""
    from fmsam.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _assert_one_line_error(code, lines, *fragments, exit_code=2):
    assert code == exit_code, lines
    assert len(lines) == 1 and lines[0].startswith("fmsam: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines


def test_thin_stacks_pass_the_size_check():
    """Three 480x480 slices of 15 mm (a cardiac stack) are real data: only too small volumes are
    refused."""
    from fmsam.imageio import check_size, load_scalar_volume

    stack = _image(np.random.default_rng(1).random((3, 480, 480)).astype(np.float32))
    stack.SetSpacing((0.73, 0.73, 15.0))
    assert load_scalar_volume(stack, "fixed image") is stack
    for shape in ((16, 16, 16), (2, 64, 64)):
        check_size(_image(np.zeros(shape, np.float32)), "image")
    for shape in ((15, 16, 17), (3, 15, 480), (2, 40, 40), (1, 100, 100)):
        with pytest.raises(InputError, match="voxels"):
            check_size(_image(np.zeros(shape, np.float32)), "image")


def test_labels_beyond_uint32_are_refused(bad_files, tmp_path, capsys):
    """UInt32 holds the labels: 2^32 + 5 would silently become label 5."""
    labels = np.zeros(SHAPE, np.int64)
    labels[2:6, 2:6, 2:6] = 2 ** 32 + 5
    labels[8:12, 8:12, 8:12] = 5
    path = str(tmp_path / "labels64.nii.gz")
    sitk.WriteImage(_image(labels), path)
    out = tmp_path / "out"
    code, lines = _cli(["register", bad_files["good"], bad_files["good"], "--out", str(out),
                        "--fixed-labels", path, "--moving-labels", path], capsys)
    _assert_one_line_error(code, lines, path, "label 4294967301", "0 to 4294967295")
    assert not out.exists()


def test_labels_off_the_grid_name_the_file_and_what_differs(bad_files, tmp_path, capsys):
    labels = _image(np.zeros(SHAPE, np.uint8))
    labels.SetSpacing((1.0, 2.0, 1.0))
    labels.SetOrigin((0.0, 0.0, 5.0))
    path = str(tmp_path / "shifted_labels.nii.gz")
    sitk.WriteImage(labels, path)
    out = tmp_path / "out"
    code, lines = _cli(["register", bad_files["good"], bad_files["good"], "--out", str(out),
                        "--moving-labels", path], capsys)
    _assert_one_line_error(code, lines, "moving label map %s is not on the grid of the moving image %s"
                           % (path, bad_files["good"]), "spacing 1x2x1 vs 1x1x1", "origin 0x0x5 vs 0x0x0")
    assert "size" not in lines[0].split(":")[2].split("(")[0]  # only what differs is listed
    assert not out.exists()


def test_non_finite_transform_is_refused_by_jacobian_and_warp(bad_files, tmp_path, capsys):
    """A NaN displacement has no Jacobian: 0 % folding would be a lie."""
    field = np.zeros(SHAPE + (3,))
    field[4, 5, 6, 1] = np.nan
    path = str(tmp_path / "nan_transform.h5")
    sitk.WriteTransform(sitk.DisplacementFieldTransform(_image(field, vector=True)), path)
    out = tmp_path / "jacobian.nii.gz"
    code, lines = _cli(["jacobian", path, "--out", str(out)], capsys)
    _assert_one_line_error(code, lines, path, "non-finite displacements (1 of")
    code, lines = _cli(["warp", bad_files["good"], "--transform", path, "--reference", bad_files["good"],
                        "--out", str(out)], capsys)
    _assert_one_line_error(code, lines, path, "non-finite")
    assert os.listdir(tmp_path) == ["nan_transform.h5"]


def test_a_transform_too_large_for_a_finite_jacobian_is_refused(tmp_path, capsys):
    k, j, i = np.indices(SHAPE, dtype=np.float64)
    field = np.stack([i, j, k], axis=-1) * 1e20  # det J about 1e60: beyond float32
    path = str(tmp_path / "huge.h5")
    sitk.WriteTransform(sitk.DisplacementFieldTransform(_image(field, vector=True)), path)
    code, lines = _cli(["jacobian", path, "--out", str(tmp_path / "jacobian.nii.gz")], capsys)
    _assert_one_line_error(code, lines, "transform %s has displacements too large for a finite Jacobian" % path)
    assert os.listdir(tmp_path) == ["huge.h5"]


def test_warp_and_jacobian_never_write_over_their_inputs(bad_files, tmp_path, capsys):
    path = str(tmp_path / "identity.h5")
    sitk.WriteTransform(sitk.DisplacementFieldTransform(_image(np.zeros(SHAPE + (3,)), vector=True)), path)
    before = open(path, "rb").read()
    code, lines = _cli(["jacobian", path, "--out", path], capsys)
    _assert_one_line_error(code, lines, "--out %s is also an input of this command" % path)
    code, lines = _cli(["warp", bad_files["good"], "--transform", path, "--reference", bad_files["good"],
                        "--out", bad_files["good"]], capsys)
    _assert_one_line_error(code, lines, "--out %s is also an input" % bad_files["good"])
    assert open(path, "rb").read() == before


def test_the_largest_labels_are_counted_without_a_count_per_value():
    """Labels up to 2^32 - 1 are accepted, so Dice must not allocate a count for every value below
    them (32 GB for a label of 4e9)."""
    import tracemalloc

    from fmsam.metrics import dice_per_label

    fixed = np.zeros((20, 30, 40), np.uint32)
    fixed[2:10, 5:20, 5:30], fixed[12:18, 5:20, 5:30] = 2 ** 32 - 1, 7
    warped = np.roll(fixed, 1, axis=0)
    tracemalloc.start()
    try:
        dice = dice_per_label(fixed, warped)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dice == {7: pytest.approx(2 * 5 / 12), 2 ** 32 - 1: pytest.approx(2 * 7 / 16)}
    assert peak < 20e6


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read (No such file or directory)"),
    ("{", "is not JSON"),
    ("[1, 2]", "does not hold a JSON object"),
])
def test_the_engine_process_refuses_a_bad_request_file_in_one_line(tmp_path, capsys, content, message):
    from fmsam import worker

    request = tmp_path / "request.json"
    if content is not None:
        request.write_text(content)
    assert worker.run(str(request)) == worker.BAD_INPUT
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(worker.ERROR + " the request file ") and message in lines[0]
