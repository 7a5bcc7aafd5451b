"""Output folders: refused before any work when unusable, never a mix of two runs, nothing left by
a killed run, the same bytes from identical runs, strict JSON, and --scene failures that leave
nothing behind."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, SMALL_SHAPE as SHAPE


def _cli(argv, capsys):
    from fmsam.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def _one_line(code, lines, fragment, exit_code=2):
    assert code == exit_code and len(lines) == 1, lines
    assert lines[0].startswith("fmsam: error: ") and fragment in lines[0], lines


def _small_result(labels=True):
    """A RegistrationResult on a small grid (identity mapping), to test writing without registering."""
    from fmsam.fields import Deformation, image_on_grid, network_grid
    from fmsam.pipeline import RegistrationResult
    from fmsam.prealign import identity_affine

    fixed = sitk.GetImageFromArray(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE))
    label_map = sitk.Cast(fixed > 3000, sitk.sitkUInt32) if labels else None
    grid = network_grid(fixed, (4, 4, 4))
    return RegistrationResult(fixed=fixed, affine=identity_affine(),
                              deformation=Deformation(grid, np.zeros((4, 4, 4, 3), np.float32)),
                              inverse_deformation=Deformation(grid, np.zeros((4, 4, 4, 3), np.float32)),
                              warped=fixed, warped_labels=label_map,
                              jacobian=image_on_grid(np.ones(SHAPE, np.float32), fixed),
                              report={"folding_percent": 0.0, "labels": labels})


def test_out_that_is_a_file_or_cannot_be_written_is_refused_before_any_work(small_pair, tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    for out, fragment in ((existing, "--out %s exists and is not a folder" % existing),
                          (existing / "sub", "cannot be created: %s is not a folder" % existing),
                          ("/sys/fmsam-out", "--out /sys/fmsam-out cannot be written"),
                          ("", "--out is empty; give a folder")):
        code, lines, printed = _cli(["register", small_pair[0], small_pair[1], "--out", str(out)], capsys)
        _one_line(code, lines, fragment)
        assert printed == ""  # no stage began
    assert existing.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["results.txt"]


def test_a_previous_result_registered_again_into_its_folder_is_not_replaced(small_pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    moving = str(out / "warped.nii.gz")  # last run's result, now the moving image
    sitk.WriteImage(sitk.ReadImage(small_pair[1]), moving)
    before = open(moving, "rb").read()
    code, lines, printed = _cli(["register", small_pair[0], moving, "--out", str(out)], capsys)
    _one_line(code, lines, "--out %s would replace the input %s" % (out, moving))
    assert printed == "" and open(moving, "rb").read() == before


def test_a_reused_folder_holds_only_the_new_run(tmp_path):
    from fmsam.outputs import write_outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    first = write_outputs(_small_result(labels=True), str(out))
    assert "warped_labels.nii.gz" in first
    second = write_outputs(_small_result(labels=False), str(out))
    assert sorted(os.listdir(out)) == sorted(list(second) + ["notes.txt"])
    assert "warped_labels.nii.gz" not in os.listdir(out)  # the first run's, not this one's
    assert json.load(open(out / "report.json"))["labels"] is False
    assert (out / "notes.txt").read_text() == "the user's"


_KILLED_WRITER = """
import sys, time
sys.path[:0] = sys.argv[2:]
import fmsam.outputs as outputs
from test_outputs import _small_result

def hang():
    print("staged", flush=True)
    time.sleep(120)

outputs.write_outputs(_small_result(), sys.argv[1], before_commit=hang)
"""


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path):
    from fmsam.outputs import PARTIAL_PREFIX, partial_prefix, write_outputs

    out = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), os.path.join(ROOT, "Logic"),
                               os.path.join(ROOT, "Testing"), os.path.dirname(os.path.abspath(__file__))],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "staged"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = [name for name in os.listdir(out) if name.startswith(PARTIAL_PREFIX)]
    assert len(leftovers) == 1 and os.listdir(out / leftovers[0])  # what SIGKILL leaves
    assert not any(name in os.listdir(out) for name in ("report.json", "transform.h5"))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # a running writer's folder (another process) and the user's own hidden folder stay
        running = out / (partial_prefix().replace("-%d-" % os.getpid(), "-%d-" % alive.pid) + "x")
        running.mkdir()
        (out / ".fmsam-partial-mine").mkdir()
        # an earlier version's staging folder (no PID): removed once it is a day old
        recent, old = out / ".fmsam-partial-ab_cd123", out / ".fmsam-partial-x1y2z3w4"
        recent.mkdir()
        old.mkdir()
        os.utime(old, (time.time() - 2 * 24 * 3600,) * 2)
        write_outputs(_small_result(), str(out))
        names = set(os.listdir(out))
        assert leftovers[0] not in names and old.name not in names
        assert {running.name, ".fmsam-partial-mine", recent.name, "report.json", "transform.h5"} <= names
        assert len([name for name in names if name.startswith(PARTIAL_PREFIX)]) == 3
    finally:
        alive.kill()
        alive.wait()


def _labels(folder):
    """A label map (labels 1 and 2) on the small volumes' grid."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:8, 4:14, 4:16], labels[8:13, 4:14, 4:16] = 1, 2
    path = os.path.join(str(folder), "labels.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(labels), path)
    return path


def test_identical_runs_write_identical_bytes(small_pair, small_network_grid, tmp_path):
    """Every file but the report's timings, from two runs more than a second apart (HDF5 stores
    times in seconds); the transform is still the DisplacementFieldTransform SimpleITK reads."""
    from fmsam.cli import main

    labels = _labels(tmp_path)
    folders = [str(tmp_path / "first"), str(tmp_path / "second")]
    for folder in folders:
        assert main(["register", small_pair[0], small_pair[1], "--out", folder, "--fixed-labels", labels,
                     "--moving-labels", labels, "--device", "cpu", "--quiet"]) == 0
        time.sleep(1.1)  # the second run writes in another second
    names = sorted(os.listdir(folders[0]))
    assert names == sorted(os.listdir(folders[1])) == sorted(
        ["transform.h5", "inverse_transform.h5", "warped.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz", "overview.png",
         "report.json"])
    for name in names:
        if name != "report.json":
            assert open(os.path.join(folders[0], name), "rb").read() == \
                open(os.path.join(folders[1], name), "rb").read(), name
    reports = [json.load(open(os.path.join(folder, "report.json"))) for folder in folders]
    for report in reports:
        report.pop("seconds")
    assert reports[0] == reports[1]
    transform = sitk.ReadTransform(os.path.join(folders[1], "transform.h5"))
    assert [transform.GetNthTransform(n).GetName() for n in range(transform.GetNumberOfTransforms())] == \
        ["AffineTransform", "DisplacementFieldTransform"]
    field = sitk.DisplacementFieldTransform(transform.GetNthTransform(1)).GetDisplacementField()
    # The network grid (not the image's), extended by a few voxels to cover the fixed image's voxels.
    assert all(n <= size <= n + 12 for size, n in zip(field.GetSize(), reports[1]["network_grid"][::-1]))
    assert np.abs(sitk.GetArrayViewFromImage(field)).max() > 1e-3  # the deformable part alone: small here


def test_report_is_strict_json_with_weights_and_version(registered_sample):
    import fmsam
    from fmsam.weights import bundled_weights

    def refuse(constant):
        raise AssertionError("not JSON: %s" % constant)

    report = json.load(open(os.path.join(registered_sample, "report.json")), parse_constant=refuse)
    path, checksum = bundled_weights()
    assert report["weights"] == {"file": path, "sha256": checksum, "verified": True}
    assert report["fmsam_version"] == fmsam.__version__


def test_a_non_finite_result_is_not_written(tmp_path):
    from fmsam.errors import RegistrationError
    from fmsam.outputs import write_outputs

    result = _small_result()
    result.deformation.displacement[1, 2, 3, 0] = np.inf
    with pytest.raises(RegistrationError, match="not finite"):
        write_outputs(result, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import fmsam.outputs as outputs
    from fmsam.errors import RegistrationError

    def disk_full(image, path, useCompression=False):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: ...\n"
                           "ITK ERROR: NiftiImageIO: No space left on device")

    monkeypatch.setattr(outputs.sitk, "WriteImage", disk_full)
    out = tmp_path / "out"
    with pytest.raises(RegistrationError) as raised:
        outputs.write_outputs(_small_result(), str(out))
    assert str(raised.value) == ("the outputs could not be written to %s (ITK ERROR: NiftiImageIO: No space "
                                 "left on device); nothing was written" % out)
    assert os.listdir(tmp_path) == []


def test_a_report_with_nan_is_not_written(tmp_path):
    from fmsam.outputs import write_outputs

    result = _small_result()
    result.report["dice_after"] = float("nan")
    with pytest.raises(ValueError, match="JSON"):
        write_outputs(result, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_scene_failure_after_registering_exits_cleanly_and_writes_nothing(
        small_pair, small_network_grid, tmp_path, capsys, monkeypatch):
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    import FMSAMRegistrationLib.scene_export as scene_export

    def fail(*args, **kwargs):
        raise RuntimeError("vtkMRMLScene: cannot write bundle\nNo space left on device")

    monkeypatch.setattr(scene_export, "write_registration_scene", fail)
    out, mrb = tmp_path / "out", tmp_path / "scene.mrb"
    code, lines, _ = _cli(["register", small_pair[0], small_pair[1], "--out", str(out), "--scene", str(mrb),
                           "--device", "cpu", "--quiet"], capsys)
    _one_line(code, lines, "the scene %s could not be written (No space left on device); no output was "
              "written" % mrb, exit_code=1)
    assert os.listdir(tmp_path) == []


def test_scene_path_that_is_a_folder_is_refused_before_any_work(small_pair, tmp_path, capsys):
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    folder = tmp_path / "scene.mrb"
    folder.mkdir()
    code, lines, printed = _cli(["register", small_pair[0], small_pair[1], "--out", str(tmp_path / "out"),
                                 "--scene", str(folder)], capsys)
    _one_line(code, lines, "--scene '%s' is a folder or empty" % folder)
    assert printed == "" and os.listdir(tmp_path) == ["scene.mrb"]


def test_label_maps_sharing_no_label_give_strict_json_and_a_warning(
        small_pair, small_network_grid, tmp_path, capsys):
    """Mean Dice over no label is NaN, which is not JSON: the report leaves Dice out and says why."""
    paths = []
    for value in (1, 2):
        labels = np.zeros(SHAPE, np.uint8)
        labels[4:12, 4:14, 4:16] = value
        paths.append(str(tmp_path / ("labels%d.nii.gz" % value)))
        sitk.WriteImage(sitk.GetImageFromArray(labels), paths[-1])
    out = tmp_path / "out"
    code, lines, printed = _cli(["register", small_pair[0], small_pair[1], "--out", str(out),
                                 "--fixed-labels", paths[0], "--moving-labels", paths[1], "--device", "cpu",
                                 "--quiet"], capsys)
    assert code == 0 and "Dice" not in printed
    assert "fmsam: warning: the two label maps share no label (> 0): no Dice is reported" in lines

    def refuse(constant):
        raise AssertionError("not JSON: %s" % constant)

    report = json.load(open(out / "report.json"), parse_constant=refuse)
    assert report["dice_labels"] == 0 and not any(key.startswith("dice_") and key != "dice_labels"
                                                  for key in report)
