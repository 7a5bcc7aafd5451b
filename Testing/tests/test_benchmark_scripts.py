"""The benchmark scripts' options of issue 15: the cardiac benchmark's pair lists from issue 15's
data_splits.json roles as from issue 14's cardiac_split.json sets, its fmsam command line with another
model's weights, and benchmark.py's --modality.

Pair lists are paths only (no image is read), so these tests need no data; the tests of
foreground_ratios.py and affine_directions.py read the bundled sample pair."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fmsam.options import DEFAULT_SLICE_REFINEMENT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "Testing", "Benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "cardiac_benchmark.py")
SPLITS = os.path.join(BENCHMARKS, "data_splits.json")
sys.path.insert(0, BENCHMARKS)  # the benchmark's modules are scripts, not a package


def _pairs(tmp_path, *args):
    out = str(tmp_path / "pairs.csv")
    finished = subprocess.run([sys.executable, SCRIPT, "pairs", "--out", out] + list(args),
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert finished.returncode == 0, finished.stderr
    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def _patient(path):
    """(patient ID, sequence) of ``.../<ID>_<SEQ>.nii.gz``."""
    patient, sequence = os.path.basename(path)[: -len(".nii.gz")].split("_")
    return int(patient), sequence


@pytest.mark.parametrize("role", ["report", "selection"])
def test_pairs_of_an_issue15_role_stay_in_the_role(tmp_path, role):
    with open(SPLITS) as handle:
        cardiac = json.load(handle)["cardiac"]
    patients = cardiac[role]
    assert len(patients) == {"report": 16, "selection": 8}[role]
    rows = _pairs(tmp_path, "--splits", SPLITS, "--role", role)
    inter = [row for row in rows if row["kind"] == "inter"]
    cross = [row for row in rows if row["kind"] == "cross"]
    assert len(rows) == 2 * len(patients) and len(inter) == len(cross) == len(patients)
    seen = {_patient(row[side])[0] for row in rows for side in ("fixed", "moving")}
    assert seen == set(patients)
    assert not seen & (set(cardiac["training"]) | set(cardiac[{"report": "selection", "selection": "report"}[role]]))
    for n, (row, patient) in enumerate(zip(inter, patients)):  # n fixed, n + 1 moving, sequences in turn
        sequence = ("C0", "DE", "T2")[n % 3]
        assert _patient(row["fixed"]) == (patient, sequence)
        assert _patient(row["moving"]) == (patients[(n + 1) % len(patients)], sequence)
    for row, patient in zip(cross, patients):  # one patient, two different sequences
        (fixed, first), (moving, second) = _patient(row["fixed"]), _patient(row["moving"])
        assert fixed == moving == patient and first != second


def test_a_second_selection_set_shares_no_pair_with_the_first(tmp_path):
    from cardiac_benchmark import make_pairs

    with open(SPLITS) as handle:
        patients = json.load(handle)["cardiac"]["selection"]
    first = _pairs(tmp_path, "--splits", SPLITS, "--role", "selection")
    second = _pairs(tmp_path, "--splits", SPLITS, "--role", "selection", "--second")
    assert len(second) == 16 and [row["kind"] for row in second] == ["inter"] * 8 + ["cross"] * 8

    def unordered(rows):
        return {frozenset((_patient(row["fixed"]), _patient(row["moving"]))) for row in rows}

    assert len(unordered(second)) == 16 and not unordered(first) & unordered(second)
    for n, row in enumerate(second[:8]):  # n fixed, n + 2 moving, the sequences one further along
        sequence = ("C0", "DE", "T2")[(n + 1) % 3]
        assert _patient(row["fixed"]) == (patients[n], sequence)
        assert _patient(row["moving"]) == (patients[(n + 2) % 8], sequence)
    crosses = [("C0", "T2"), ("DE", "C0"), ("T2", "DE"), ("C0", "DE"), ("DE", "T2"), ("T2", "C0"), ("C0", "T2"),
               ("DE", "C0")]  # CROSS three further along
    for row, patient, (one, other) in zip(second[8:], patients, crosses):  # each patient once
        assert (_patient(row["fixed"]), _patient(row["moving"])) == ((patient, one), (patient, other))
    for few in ([101, 102], [101, 102, 103], [101, 102, 103, 104]):  # these would repeat or self-pair patients
        with pytest.raises(ValueError, match="at least 5 patients"):
            make_pairs(few, pair_set=2)
    assert len(make_pairs([101, 102, 103, 104, 111], pair_set=2)) == 10
    assert _pairs(tmp_path, "--splits", SPLITS, "--role", "selection", "--pair-set", "2") == second


def test_a_third_selection_set_shares_no_pair_with_the_first_two(tmp_path):
    from cardiac_benchmark import make_pairs

    with open(SPLITS) as handle:
        patients = json.load(handle)["cardiac"]["selection"]
    sets = [_pairs(tmp_path, "--splits", SPLITS, "--role", "selection", "--pair-set", str(k)) for k in (1, 2, 3)]
    third = sets[2]
    assert len(third) == 16 and [row["kind"] for row in third] == ["inter"] * 8 + ["cross"] * 8
    unordered = [frozenset((_patient(row["fixed"]), _patient(row["moving"]))) for rows in sets for row in rows]
    assert len(unordered) == len(set(unordered)) == 48  # no pair twice, either way round, across the three sets
    for n, row in enumerate(third[:8]):  # n fixed, n + 3 moving, the sequences two further along
        sequence = ("C0", "DE", "T2")[(n + 2) % 3]
        assert _patient(row["fixed"]) == (patients[n], sequence)
        assert _patient(row["moving"]) == (patients[(n + 3) % 8], sequence)
    for n, patient in enumerate(patients):  # each patient's three cross pairs cover its three sequence pairs
        mine = [frozenset(s for _, s in (_patient(row["fixed"]), _patient(row["moving"])))
                for rows in sets for row in rows[8:] if _patient(row["fixed"])[0] == patient]
        assert len(mine) == 3 and set(mine) == {frozenset(p) for p in (("C0", "DE"), ("DE", "T2"), ("C0", "T2"))}
    assert [(_patient(row["fixed"])[1], _patient(row["moving"])[1]) for row in third[8:11]] == [
        ("DE", "T2"), ("T2", "C0"), ("DE", "C0")]
    for few in ([101, 102, 103, 104, 111], [101, 102, 103, 104, 111, 116]):
        with pytest.raises(ValueError, match="at least 7 patients"):
            make_pairs(few, pair_set=3)
    assert len(make_pairs(patients[:7], pair_set=3)) == 14
    with pytest.raises(ValueError, match="pair_set is 1, 2 or 3"):
        make_pairs(patients, pair_set=4)


def test_issue14_sets_still_give_their_pairs(tmp_path):
    from cardiac_benchmark import make_pairs

    with open(os.path.join(BENCHMARKS, "cardiac_split.json")) as handle:
        report = json.load(handle)["report"]
    rows = _pairs(tmp_path, "--set", "report")
    assert len(rows) == 2 * len(report) == 64
    assert rows == [{key: str(value) for key, value in row.items()} for row in make_pairs(report)]


def test_role_goes_with_splits_only(tmp_path):
    for args in (["--splits", SPLITS], ["--set", "report", "--role", "report"],
                 ["--set", "report", "--splits", SPLITS, "--role", "report"]):
        finished = subprocess.run([sys.executable, SCRIPT, "pairs", "--out", str(tmp_path / "x.csv")] + args,
                                  capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert finished.returncode == 2 and not os.path.exists(tmp_path / "x.csv"), args


def test_weights_and_labels_of_fmsam_rows(tmp_path):
    from cardiac_benchmark import fmsam_command, method_name, ordered_methods

    pair = {"fixed": "f.nii.gz", "moving": "m.nii.gz"}
    assert "--weights" not in fmsam_command(pair, "out", 0)
    weights = str(tmp_path / "model.pt")
    command = fmsam_command(pair, "out", 0, weights)
    assert command[command.index("--weights") + 1] == weights and "--allow-unverified-weights" in command
    open(weights + ".sha256", "w").close()
    assert "--allow-unverified-weights" not in fmsam_command(pair, "out", 0, weights)
    command = fmsam_command(pair, "out", 0)  # the engine's default, said explicitly
    assert command[command.index("--slice-refinement") + 1] == DEFAULT_SLICE_REFINEMENT
    for setting in ("off", "auto"):
        command = fmsam_command(pair, "out", 0, slice_refinement=setting)
        assert command[command.index("--slice-refinement") + 1] == setting
    assert method_name("fmsam-fast", "adam") == "fmsam-fast[adam]"
    assert method_name("fmsam-fast", None) == "fmsam-fast" and method_name("identity", "adam") == "identity"
    assert ordered_methods({"ants-syn", "fmsam-fast[b]", "identity", "fmsam-fast", "fmsam-fast[a]"}) == [
        "identity", "fmsam-fast", "fmsam-fast[a]", "fmsam-fast[b]", "ants-syn"]


def test_cardiac_set_reaches_the_fmsam_process(sample_paths, tmp_path):
    """cardiac_benchmark.py run --set: the engine constant is set in the fmsam process that registers
    (report.json's network grid follows a larger fewest-voxels-per-axis), the plain command is
    ``-m fmsam.cli``."""
    from cardiac_benchmark import LOGIC, fmsam_command

    pair = {"fixed": sample_paths["fixed"], "moving": sample_paths["moving"]}
    assert fmsam_command(pair, "out", 0)[1:3] == ["-m", "fmsam.cli"]
    grids = []
    for settings in ((), ("inference.MIN_GRID=88",)):
        out = str(tmp_path / ("out%d" % len(settings)))
        environment = dict(os.environ, PYTHONPATH=LOGIC, OMP_NUM_THREADS="2")
        finished = subprocess.run(fmsam_command(pair, out, 0, settings=settings), env=environment,
                                  capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
        with open(os.path.join(out, "report.json")) as handle:
            grids.append(json.load(handle)["network_grid"])
    assert grids[0] == [80, 104, 104]  # the bundled budget on a 2 mm head: 2.25-2.3 mm voxels
    assert grids[1] == [88, 104, 104]  # every axis at least 88 in that process only


def test_benchmark_modality_sets_the_normalisation(tmp_path):
    """A CT-like image without air (rendered abdomen: -150 to 250 HU) is MR to ``auto`` (percentiles
    to [0, 1]); ``modality="ct"`` maps it through the engine's CT knots (-150 to 250 HU to [0, 1])."""
    import SimpleITK as sitk

    from benchmark import normalised_pair

    voxels = np.linspace(-150.0, 250.0, 8 * 24 * 24, dtype=np.float32).reshape(8, 24, 24)
    pair = {}
    for role in ("fixed", "moving"):
        pair[role] = str(tmp_path / (role + ".nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(voxels), pair[role])
    auto = sitk.GetArrayFromImage(normalised_pair(pair)[0])
    ct = sitk.GetArrayFromImage(normalised_pair(pair, "ct")[1])
    assert auto.min() == 0.0 and auto.max() == 1.0
    assert np.allclose(ct, (voxels + 150.0) / 400.0, atol=1e-6)


def test_demons_levels_keep_isotropic_images_and_spare_thin_axes():
    """``benchmark.demons_level_settings``: an isotropic brain-sized grid keeps the factors, sigma and
    step the demons always ran with; a 3-slice stack (0.73 mm in plane, 12 mm slices) is not shrunk
    along its slices, smoothed by the same physical sigma on every axis, and its update step bounded
    by half an in-plane voxel."""
    import SimpleITK as sitk

    from benchmark import DEMONS_LEVELS, demons_level_settings

    brain = sitk.Image([120, 120, 90], sitk.sitkFloat32)
    brain.SetSpacing([2.0, 2.0, 2.0])
    stack = sitk.Image([478, 482, 3], sitk.sitkFloat32)
    stack.SetSpacing([0.729, 0.729, 12.0])
    for shrink, _ in DEMONS_LEVELS:
        assert demons_level_settings(brain, shrink) == ([shrink] * 3, [1.5] * 3, 0.5)
        factors, sigmas, step = demons_level_settings(stack, shrink)
        assert factors == [shrink, shrink, 1]
        spacing = [sp * f for sp, f in zip(stack.GetSpacing(), factors)]
        assert np.allclose([s * sp for s, sp in zip(sigmas, spacing)], 1.5 * spacing[0])
        normaliser = sum(sp * sp for sp in spacing) * step * step / 3.0  # ITK's ESM demons bound
        assert np.isclose(np.sqrt(normaliser), 0.5 * spacing[0])
    tiny = sitk.Image([6, 40, 2], sitk.sitkFloat32)  # never fewer than 2 voxels (1 stays 1)
    assert demons_level_settings(tiny, 4)[0] == [3, 4, 1]


CARDIAC = os.path.join(ROOT, "..", "shared", "data", "cardiac_myops")


@pytest.mark.skipif(not os.path.isfile(os.path.join(CARDIAC, "101_DE.nii.gz")),
                    reason="needs ../shared/data/cardiac_myops beside the repository")
def test_cardiac_demons_registers_a_real_cross_sequence_stack():
    """The cardiac benchmark's ``demons`` on a selection patient's 5-slice stacks (101_C0 <- 101_DE,
    0.73 mm in plane, 12 mm slices): exit 0, a finite field on the fixed grid, no folding to speak of
    and a higher NMI than leaving the moving image where it is. Measured: identity 1.0224, demons
    1.0567, folding 0 %, min det J 0.14, about 12 s."""
    import SimpleITK as sitk

    from cardiac_benchmark import folding, nmi_on_fixed, run_demons, run_identity

    pair = {"kind": "cross", "fixed": os.path.join(CARDIAC, "101_C0.nii.gz"),
            "moving": os.path.join(CARDIAC, "101_DE.nii.gz")}
    fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
    code, seconds, warped, field = run_demons(pair, 1)
    assert code == 0
    assert field.shape == sitk.GetArrayViewFromImage(fixed).shape + (3,) and np.all(np.isfinite(field))
    fold, jacobian_min = folding(field, fixed)
    nmi = nmi_on_fixed(fixed, warped)
    identity = nmi_on_fixed(fixed, run_identity(pair, 1)[2])
    print("identity NMI %.5f, demons NMI %.5f, folding %.4f %%, min det J %.3f, %.1f s"
          % (identity, nmi, fold, jacobian_min, seconds))
    assert fold < 1.0
    assert nmi > identity + 0.015


def test_majority_vote_counts_and_breaks_ties_to_the_smaller_label():
    from make_template_pairs import majority_vote

    maps = np.array([[[[3, 0, 7]]], [[[3, 5, 2]]], [[[1, 5, 7]]], [[[1, 0, 2]]]], dtype=np.uint16)
    # voxel 0: 3,3,1,1 (tie -> 1); voxel 1: 0,5,5,0 (tie -> 0); voxel 2: 7,2,7,2 (tie -> 2)
    assert majority_vote(maps).tolist() == [[[1, 0, 2]]]
    assert majority_vote(maps[:3]).tolist() == [[[3, 5, 7]]]
    assert majority_vote(maps).dtype == np.uint16


def _fake_cache(tmp_path, subjects, shape=(4, 5, 6)):
    """A cache as Training/prepare_data.py writes it, and an IXI folder with the template subject's
    T1 (the grid the templates are written on); subject i's image is constant i / 10, its labels i."""
    import SimpleITK as sitk

    cache, ixi = tmp_path / "cache", tmp_path / "ixi"
    for folder in (cache, ixi / "T1"):
        folder.mkdir(parents=True)
    with open(cache / "template.json", "w") as handle:
        json.dump({"template": subjects[0], "train": subjects[:1], "val": subjects}, handle)
    for index, subject in enumerate(subjects):
        np.savez_compressed(cache / (subject + ".npz"),
                            image=np.full(shape, index / 10, dtype=np.float16),
                            labels=np.full(shape, index, dtype=np.uint16))
    grid = sitk.GetImageFromArray(np.zeros(shape, dtype=np.float32))
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin((-10.0, 4.0, 7.0))
    sitk.WriteImage(grid, str(ixi / "T1" / (subjects[0] + "_T1.nii.gz")))
    return cache, ixi


def test_template_pairs_leave_the_subject_out(tmp_path):
    import SimpleITK as sitk

    subjects = ["S0", "S1", "S2", "S3"]
    cache, ixi = _fake_cache(tmp_path, subjects)
    # labels: subject i is i everywhere; give S1 and S2 the same labels so the vote has a majority
    with np.load(cache / "S2.npz") as data:
        image = data["image"]
    np.savez_compressed(cache / "S2.npz", image=image, labels=np.full(image.shape, 1, dtype=np.uint16))
    out = tmp_path / "out"
    script = os.path.join(BENCHMARKS, "make_template_pairs.py")
    finished = subprocess.run([sys.executable, script, "--cache", str(cache), "--ixi", str(ixi),
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    template = sitk.ReadImage(str(out / "template_without_S0.nii.gz"))
    assert template.GetSpacing() == (2.0, 2.0, 2.0) and template.GetOrigin() == (-10.0, 4.0, 7.0)
    # without S0: mean of 0.1, 0.2, 0.3 (float16 storage) and labels 1, 1, 3 -> 1
    assert np.allclose(sitk.GetArrayFromImage(template), 0.2, atol=1e-3)
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "template_without_S0_labels.nii.gz"))))) == {1}
    # without S1: mean of 0, 0.2, 0.3; labels 0, 1, 3 (three-way tie -> 0)
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "template_without_S1.nii.gz"))),
                       0.5 / 3, atol=1e-3)
    with open(out / "pairs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(subjects)
    assert rows[0]["fixed"] == "template_without_S0.nii.gz" and rows[0]["moving"].endswith("S0_T1.nii.gz")
    assert rows[1]["moving"] == "template_without_S0.nii.gz" and rows[1]["fixed_labels"].endswith("S0_labels.nii.gz")
    assert os.path.normpath(os.path.join(str(out), rows[0]["moving"])) == str(ixi / "T1" / "S0_T1.nii.gz")


def test_stripped_templates_are_zero_outside_their_labels(tmp_path):
    import SimpleITK as sitk

    subjects = ["S0", "S1", "S2"]
    cache, ixi = _fake_cache(tmp_path, subjects)
    with np.load(cache / "S1.npz") as data:
        labels = data["labels"].copy()
    labels[:2] = 0  # S1 and S0 (all 0) outvote S2 (all 2) in the first two slices of S2's template
    np.savez_compressed(cache / "S1.npz", image=np.full(labels.shape, 0.1, np.float16), labels=labels)
    out = tmp_path / "out"
    script = os.path.join(BENCHMARKS, "make_template_pairs.py")
    finished = subprocess.run([sys.executable, script, "--cache", str(cache), "--ixi", str(ixi),
                               "--out", str(out), "--strip"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "template_without_S2.nii.gz")))
    # without S2: S0 (0.0, labels 0) and S1 (0.1, labels 0 then 1): ties 0 vs 1 -> 0 everywhere
    assert np.all(image == 0)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "template_without_S0.nii.gz")))
    # without S0: S1 (0.1; 0 in slices 0-1, else 1) and S2 (0.2, labels 2): ties -> 0 in slices 0-1
    assert np.all(image[:2] == 0) and np.allclose(image[2:], 0.15, atol=1e-3)


def test_stripped_pairs_zero_both_images_beyond_one_voxel_of_their_labels(tmp_path):
    """make_pairs.py --stripped: each subject's T1 copied with every voxel farther than one voxel
    (3x3x3 cube, clipped at the image's border) from its labels set to 0, voxel for voxel the
    trainer's ``skull_stripped``; geometry kept; the pairs use the copies, labels as given; a label
    map off its image's grid is refused."""
    import SimpleITK as sitk
    import torch

    sys.path.insert(0, os.path.join(ROOT, "Training"))
    from training_data import skull_stripped

    ixi = tmp_path / "ixi"
    (ixi / "T1").mkdir(parents=True)
    (ixi / "labels").mkdir()
    subjects = ["S0", "S1", "S2"]
    (ixi / "val.txt").write_text("\n".join(subjects) + "\n")
    rng = np.random.default_rng(3)
    arrays = {}
    for n, subject in enumerate(subjects):
        values = rng.uniform(1.0, 2.0, (7, 8, 9)).astype(np.float32)
        labels = np.zeros((7, 8, 9), np.uint16)
        labels[3, 4, 2 + n] = 5  # inside: the voxel and its 26 neighbours are kept
        labels[0, 0, 0] = 2  # a corner: 8 voxels kept, the cube clipped at the border
        arrays[subject] = values, labels
        image, labels_image = sitk.GetImageFromArray(values), sitk.GetImageFromArray(labels)
        for written in (image, labels_image):
            written.SetSpacing((2.0, 2.0, 2.0))
            written.SetOrigin((-3.0, 1.0, 5.0))
        sitk.WriteImage(image, str(ixi / "T1" / (subject + "_T1.nii.gz")))
        sitk.WriteImage(labels_image, str(ixi / "labels" / (subject + "_labels.nii.gz")))
    out, stripped = tmp_path / "pairs" / "pairs.csv", tmp_path / "stripped"
    script = os.path.join(BENCHMARKS, "make_pairs.py")
    finished = subprocess.run([sys.executable, script, "--data", str(ixi), "--offsets", "1", "--out", str(out),
                               "--stripped", str(stripped)], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    for n, row in enumerate(rows):
        fixed, moving = (os.path.normpath(os.path.join(str(out.parent), row[side])) for side in ("fixed", "moving"))
        assert fixed == str(stripped / ("S%d_T1_stripped.nii.gz" % n))
        assert moving == str(stripped / ("S%d_T1_stripped.nii.gz" % ((n + 1) % 3)))
        labels_path = os.path.normpath(os.path.join(str(out.parent), row["fixed_labels"]))
        assert labels_path == str(ixi / "labels" / ("S%d_labels.nii.gz" % n))
        image = sitk.ReadImage(fixed)
        assert image.GetSpacing() == (2.0, 2.0, 2.0) and image.GetOrigin() == (-3.0, 1.0, 5.0)
        got = sitk.GetArrayFromImage(image)
        values, labels = arrays["S%d" % n]
        assert np.count_nonzero(got) == 27 + 8
        assert np.array_equal(got[2:5, 3:6, 1 + n:4 + n], values[2:5, 3:6, 1 + n:4 + n])
        expected = skull_stripped(torch.from_numpy(values)[None, None], torch.from_numpy(labels.astype(np.int64))[None, None])
        assert np.array_equal(got, expected[0, 0].numpy())
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(ixi / "T1" / "S0_T1.nii.gz"))), arrays["S0"][0])
    shifted = sitk.ReadImage(str(ixi / "labels" / "S1_labels.nii.gz"))
    shifted.SetOrigin((-3.0, 1.0, 7.0))
    sitk.WriteImage(shifted, str(ixi / "labels" / "S1_labels.nii.gz"))
    refused = subprocess.run([sys.executable, script, "--data", str(ixi), "--offsets", "1", "--out",
                              str(tmp_path / "again.csv"), "--stripped", str(tmp_path / "again")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "S1_labels.nii.gz is not on the grid of" in refused.stderr
    assert not (tmp_path / "again.csv").exists() and not (tmp_path / "again").exists()  # nothing written


def test_foreground_ratios_of_a_pairs_file(sample_paths, stripped_moving, tmp_path, capsys):
    """The ratio the fast mode's two-way affine is decided by, per pair, over a pairs file: the
    sample pair both ways, and its moving image skull-stripped (a brain alone, about a third of a head)."""
    import foreground_ratios

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fixed,moving\n%s,%s\n%s,%s\n%s,%s\n" % (
        sample_paths["fixed"], sample_paths["moving"], sample_paths["moving"], sample_paths["fixed"],
        sample_paths["fixed"], stripped_moving))
    found = foreground_ratios.ratios(str(pairs))
    assert found[0] == pytest.approx(1.0 / found[1])
    assert 0.7 < found[0] < 1.4
    assert 0.2 < found[2] < 0.45
    foreground_ratios.main(["sample=%s" % pairs])
    assert "3 pairs, below 0.50:  1" in capsys.readouterr().out


def test_affine_directions_of_a_stripped_moving_image(sample_paths, stripped_moving, tmp_path):
    """The study behind fast mode's two-way affine, on the sample pair with its moving image
    skull-stripped: the reverse alignment scores higher and overlaps the labels better."""
    import affine_directions

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fixed,moving,fixed_labels,moving_labels\n%s,%s,%s,%s\n" % (
        sample_paths["fixed"], stripped_moving, sample_paths["fixed_labels"], sample_paths["moving_labels"]))
    affine_directions.main([str(tmp_path / "out.csv"), "sample=%s" % pairs])
    with open(tmp_path / "out.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["set"] == "sample"
    row = {key: float(value) for key, value in rows[0].items() if key != "set"}
    assert row["s_rev"] > row["s_fwd"]
    assert row["dice_fwd"] < 0.35 and row["dice_rev"] > 0.42  # 0.273 and 0.448
    assert row["fg_moving"] < 0.5 * row["fg_fixed"]


def test_speed_summary_of_two_engine_versions(tmp_path, capsys):
    """speed_versions.sh's log, summarised per version: whole-command and stage seconds."""
    import speed_summary

    log = tmp_path / "speed.log"
    log.write_text("old whole 4.00 s peak 990000 KB\n  old 0.9 1.4 3.2\n"
                   "new whole 3.50 s peak 980000 KB\n  new 0.7 1.2 2.8\n"
                   "old whole 5.00 s peak 995000 KB\n  old 1.1 1.6 3.6\n"
                   "new whole 3.70 s peak 985000 KB\n  new 0.9 1.2 3.0\n")
    speed_summary.main(str(log))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "old                    n=2 whole mean 4.50 (4.00-5.00)  affine 1.00 network 1.50 registration 3.40",
        "new                    n=2 whole mean 3.60 (3.50-3.70)  affine 0.80 network 1.20 registration 2.90"]
    empty = tmp_path / "empty.log"
    empty.write_text("registered in 3.0 s\n")
    with pytest.raises(SystemExit, match="no 'whole' lines"):
        speed_summary.main(str(empty))


def test_engine_settings_change_slice_refinement_constants_and_refuse_others(monkeypatch):
    import fmsam.slice_refinement as refinement
    from cardiac_diagnostics import engine_settings

    for name in ("WINDOW", "REGULARISATION"):
        monkeypatch.setattr(refinement, name, getattr(refinement, name))  # restored after the test
    assert engine_settings(["WINDOW=13", "REGULARISATION=300"]) == {"WINDOW": 13, "REGULARISATION": 300.0}
    assert refinement.WINDOW == 13 and isinstance(refinement.REGULARISATION, float)
    for bad in ("FOO=1", "WINDOW", "stack_axis=1", "WINDOW=x", "WINDOW=1.5", "INSTANCE_OPTIMISATION_ON_STACKS=1"):
        with pytest.raises(SystemExit, match="NAME=VALUE"):
            engine_settings([bad])



def test_benchmark_set_changes_fmsam_constants_and_refuses_others(monkeypatch, tmp_path):
    import fmsam.inference as inference
    import fmsam.instance_optimisation as io
    from benchmark import engine_constants

    monkeypatch.setattr(inference, "IO_IMAGE_SCALE", inference.IO_IMAGE_SCALE)  # restored after the test
    monkeypatch.setattr(io, "GRADICON_WEIGHT", io.GRADICON_WEIGHT)
    assert engine_constants(["inference.IO_IMAGE_SCALE=1.5", "instance_optimisation.GRADICON_WEIGHT=1"]) == {
        "inference.IO_IMAGE_SCALE": 1.5, "instance_optimisation.GRADICON_WEIGHT": 1.0}
    assert inference.IO_IMAGE_SCALE == 1.5 and isinstance(io.GRADICON_WEIGHT, float)
    for bad in ("IO_IMAGE_SCALE=1.5", "inference.IO_IMAGE_SCALE", "inference.IO_IMAGE_SCALE=x", "nosuch.X=1",
                "inference.grid_for=1", "inference.NOSUCH=1", "os.path.SEP=1", "slice_refinement.STEPS=1.5"):
        with pytest.raises(SystemExit, match="MODULE.NAME=VALUE"):
            engine_constants([bad])
    # without a label the rows would pass for the defaults': refused before any pair is read
    out = tmp_path / "out"
    finished = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "benchmark.py"), "run", "--pairs", "nosuch.csv",
                               "--out", str(out), "--methods", "fmsam-fast", "--set", "inference.IO_IMAGE_SCALE=1.5"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert finished.returncode != 0 and "--set needs --label" in finished.stderr and not out.exists()
