"""fmsam evaluate: a bad pair stops the batch on its own line naming the CSV line and the files, and
no results file is left."""
import csv
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import small_volume, write_small_pair


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """NIfTI volumes a, b, and b with one NaN voxel (which ITK's NIfTI reader gives as 0)."""
    folder = tmp_path_factory.mktemp("evaluate")
    paths = dict(zip("ab", write_small_pair(folder, ".nii.gz")))
    poisoned = small_volume(0.15)
    poisoned[5, 6, 7] = np.nan
    paths["nan"] = str(folder / "nan.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(poisoned), paths["nan"])
    return paths


def _pairs(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving"])
        writer.writerows(rows)
    return str(path)


def _run(argv, capsys):
    from fmsam.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_a_bad_pair_stops_the_batch_before_any_work_naming_its_line(images, tmp_path, capsys):
    pairs = _pairs(tmp_path / "pairs.csv", [(images["a"], images["b"]), (images["b"], images["a"]),
                                            (images["a"], images["nan"])])
    results = tmp_path / "results.csv"
    code, err = _run(["evaluate", "--pairs", pairs, "--out", str(results), "--device", "cpu"], capsys)
    assert code == 2
    assert err == ("fmsam: error: pairs file %s, line 4 (pair 3 of 3: fixed %s, moving %s): moving image %s "
                   "contains NaN or infinite values (1 voxels in the file's data)\n"
                   % (pairs, images["a"], images["nan"], images["nan"]))
    assert not results.exists()


def test_a_failed_registration_stops_the_batch_on_its_own_line(images, small_network_grid, tmp_path, capsys,
                                                               monkeypatch):
    import fmsam.pipeline as pipeline
    from fmsam.errors import RegistrationError

    calls = []
    real_check = pipeline.check_finite_result

    def fail_second(values, network, what="displacement field"):
        calls.append(what)
        if calls.count("displacement field") == 2:
            raise RegistrationError("the registration produced a non-finite displacement field")
        return real_check(values, network, what)

    monkeypatch.setattr(pipeline, "check_finite_result", fail_second)
    pairs = _pairs(tmp_path / "pairs.csv", [(images["a"], images["b"]), (images["b"], images["a"])])
    results = tmp_path / "results.csv"
    code, err = _run(["evaluate", "--pairs", pairs, "--out", str(results), "--device", "cpu"], capsys)
    assert code == 1
    progress, message = err.split("\n")[:2]
    assert progress.startswith("\r[") and " 1/2" in progress  # the bar of the pair done, then a new line
    assert message == ("fmsam: error: pairs file %s, line 3 (pair 2 of 2: fixed %s, moving %s): the "
                       "registration produced a non-finite displacement field"
                       % (pairs, images["b"], images["a"]))
    assert err.endswith(message + "\n") and not results.exists()


@pytest.mark.parametrize("option,fragment", [
    (["--io-steps", "5000"], "io_steps must be an integer from 0 to 2000, not 5000"),
    (["--out", "FOLDER"], "is a folder or empty; give a file name"),
    (["--out", ""], "--out '' is a folder or empty; give a file name"),
    (["--out", "PAIRS"], "is also an input of this command; give another file name"),
])
def test_bad_options_are_refused_before_any_pair_is_read(images, tmp_path, capsys, option, fragment):
    pairs = _pairs(tmp_path / "pairs.csv", [(images["a"], os.path.join(str(tmp_path), "missing.nii.gz"))])
    argv = ["evaluate", "--pairs", pairs, "--out", str(tmp_path / "results.csv")] + \
        [{"FOLDER": str(tmp_path), "PAIRS": pairs}.get(value, value) for value in option]
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and fragment in err and err.startswith("fmsam: error: ")
    assert sorted(os.listdir(tmp_path)) == ["pairs.csv"]


def test_a_pairs_file_that_is_not_text_is_one_line(images, tmp_path, capsys):
    code, err = _run(["evaluate", "--pairs", images["a"], "--out", str(tmp_path / "results.csv")], capsys)
    assert code == 2 and err.startswith("fmsam: error: pairs file %s is not a CSV text file (" % images["a"])
    assert err.count("\n") == 1 and os.listdir(tmp_path) == []
