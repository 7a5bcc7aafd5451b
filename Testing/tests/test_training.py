"""The trainer: preparing data, a short run lowering the loss, exact resume, Slicer-style exit."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SAMPLE

TRAINING = os.path.join(ROOT, "Training")
sys.path.insert(0, TRAINING)  # the trainer's modules are scripts, not a package
TINY = ["--grid", "16,24,24", "--coarse-channels", "4,8", "--fine-channels", "4,8",
        "--val-every", "4", "--val-pairs", "2", "--checkpoint-every", "2", "--threads", "1",
        "--device", "cpu"]


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(TRAINING, script)] + list(args),
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cache"))
    done = _run("prepare_data.py", "--data", SAMPLE, "--cache", folder, "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert sorted(f for f in os.listdir(folder) if f.endswith(".npz")) == [
        "IXI012-HH-1211.npz", "IXI013-HH-1212.npz", "IXI014-HH-1236.npz"]
    return folder


def _losses(run):
    with open(os.path.join(run, "log.csv")) as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_short_training_run_lowers_the_loss(cache, tmp_path):
    run = str(tmp_path / "run")
    # Two training subjects and no augmentation: every step sees the same symmetric objective.
    done = _run("train.py", "--cache", cache, "--run", run, "--steps", "12", "--lr", "3e-3",
                "--warmup", "1", "--no-augment", *TINY)
    assert done.returncode == 0, done.stderr
    losses = _losses(run)
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.01, losses


def test_resume_continues_identically(cache, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    settings = ["--cache", cache, "--steps", "6", "--optimizer", "sam", *TINY]
    assert _run("train.py", "--run", whole, *settings).returncode == 0
    first = _run("train.py", "--run", split, "--max-minutes", "1e-9", *settings)
    assert first.returncode == 0 and "run again to resume" in first.stdout, first.stdout
    assert _losses(split) == _losses(whole)[:len(_losses(split))]
    second = _run("train.py", "--run", split, *settings)
    assert second.returncode == 0 and "resumed" in second.stdout, second.stderr
    assert _losses(split) == _losses(whole)
    a = torch.load(os.path.join(whole, "latest.pt"), weights_only=True)["network"]
    b = torch.load(os.path.join(split, "latest.pt"), weights_only=True)["network"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_refuse_to_resume(cache, tmp_path):
    run = str(tmp_path / "run")
    assert _run("train.py", "--cache", cache, "--run", run, "--steps", "2", *TINY).returncode == 0
    again = _run("train.py", "--cache", cache, "--run", run, "--steps", "2", "--rho", "0.1", *TINY)
    assert again.returncode == 2 and "other settings" in again.stderr


def test_two_cpu_ranks_hold_identical_weights_after_ddp_steps(cache, tmp_path):
    """torchrun with two gloo processes: each rank draws its own pairs, SAM's ascent gradient
    stays local, the descent gradient is averaged, and both ranks end with the same weights."""
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    settings = ["--cache", cache, "--steps", "2", "--optimizer", "sam", *TINY]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--", os.path.join(TRAINING, "train.py"), "--run", ddp] + settings,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights identical on all 2 ranks" in done.stdout
    assert _run("train.py", "--run", single, *settings).returncode == 0
    a = torch.load(os.path.join(ddp, "latest.pt"), weights_only=True)["network"]
    b = torch.load(os.path.join(single, "latest.pt"), weights_only=True)["network"]
    # Rank 1's pairs entered the averaged gradient, so two ranks do not train like one.
    assert not all(torch.equal(a[k], b[k]) for k in a)


def _train_module():
    import train
    return train


def test_pair_choice_keeps_old_runs_and_adds_synthetic_and_identical_pairs(cache):
    train = _train_module()
    from training_data import SubjectCache, read_split, sample_pair

    grid = (16, 24, 24)
    subjects = SubjectCache(cache, read_split(cache)["train"], grid)
    args = train.parse_args(["--cache", cache, "--run", "unused"])
    for step in range(3):  # without the new options: exactly the pairs drawn before they existed
        old = sample_pair(subjects, 0, step)
        new = train.draw_pair(args, subjects, step, 0, grid)
        assert all(torch.equal(x, y) for x, y in zip(old, new))
    args.identity_fraction = 1.0
    fixed, moving = train.draw_pair(args, subjects, 0, 0, grid)
    assert torch.equal(fixed, moving)
    args.identity_fraction, args.synth_fraction = 0.0, 1.0
    fixed, moving = train.draw_pair(args, subjects, 0, 0, grid)
    assert fixed.shape == moving.shape == (1, 1) + grid
    assert not any(torch.equal(fixed, x) for x in sample_pair(subjects, 0, 0))


def test_synthetic_pairs_share_shape_and_palette():
    """Both images of a synthetic pair show one anatomy in one palette (our loss is local
    correlation, which needs a shared contrast); each pair has a new palette."""
    from synth import random_deformation, random_label_map, random_palette, render, synth_pair

    from fmsam.layers import warp

    shape = (24, 32, 32)
    fixed, moving = synth_pair(torch.Generator().manual_seed(3), shape)
    again = synth_pair(torch.Generator().manual_seed(3), shape)
    assert torch.equal(fixed, again[0]) and torch.equal(moving, again[1])
    assert fixed.shape == moving.shape == (1, 1) + shape
    assert 0.0 <= float(fixed.min()) and float(fixed.max()) <= 1.0
    generator = torch.Generator().manual_seed(4)
    labels = random_label_map(generator, shape)
    assert 4 <= len(torch.unique(labels)) <= 16
    deformed = warp(labels, random_deformation(generator, shape), mode="nearest")
    agreement = float((deformed == labels).float().mean())
    assert 0.5 < agreement < 1.0  # the same anatomy, moved

    def label_means(image):
        return torch.stack([image[labels == v].mean() for v in torch.unique(labels)])

    def correlation(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    palette, other = random_palette(generator), random_palette(generator)
    one, two, three = (render(generator, labels, p) for p in (palette, palette, other))
    # Same palette: the same label order despite independent bias, blur, noise and gamma.
    assert correlation(label_means(one), label_means(two)) > 0.9
    assert correlation(label_means(one), label_means(three)) < 0.5


def test_thick_slice_and_intensity_curve_augmentations():
    from training_data import apply_intensity_curve, random_intensity_curve, thick_slices

    # Stripes one voxel wide along each axis, added: averaging slabs along one axis removes the
    # stripes along that axis and leaves the others as they were.
    shape = (16, 20, 24)
    stripes = [(torch.arange(n) % 2).float() for n in shape]
    image = (stripes[0].view(-1, 1, 1) + stripes[1].view(1, -1, 1) + stripes[2].view(1, 1, -1))[None, None] / 3
    for seed in range(6):
        thick = thick_slices(image, torch.Generator().manual_seed(seed))
        assert thick.shape == image.shape
        kept = sorted(float(thick.diff(dim=d).abs().mean() / image.diff(dim=d).abs().mean()) for d in (2, 3, 4))
        assert kept[0] < 0.3 and kept[1] > 0.99 and kept[2] > 0.99, kept
    x, y = random_intensity_curve(torch.Generator().manual_seed(2))
    assert float(y[0]) == 0.0
    mapped = apply_intensity_curve(image, (x, y))
    assert float(mapped.max()) == pytest.approx(1.0)
    assert float(apply_intensity_curve(torch.zeros(1, 1, 2, 2, 2), (x, y)).abs().max()) == 0.0
    # The curve is applied, not approximated: control points map to their values (then rescaled).
    points = x.view(1, 1, -1, 1, 1)
    assert torch.allclose(apply_intensity_curve(points, (x, y)).flatten(), y / y.max(), atol=1e-6)


def test_training_on_synthetic_and_identical_pairs_runs(cache, tmp_path):
    run = str(tmp_path / "mixed")
    done = _run("train.py", "--cache", cache, "--run", run, "--steps", "4", "--synth-fraction", "0.5",
                "--identity-fraction", "0.25", *TINY)
    assert done.returncode == 0, done.stderr
    assert len(_losses(run)) == 4


def test_fine_tuning_starts_from_given_weights(cache, tmp_path):
    """--init: a run starts from another run's weights (the bundled model is fine-tuned this way),
    with the augmentations for thick slices and new contrasts; a network of another shape is refused."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert _run("train.py", "--cache", cache, "--run", first, "--steps", "2", *TINY).returncode == 0
    initial = os.path.join(first, "latest.pt")
    # --lr 0: the fine-tuning run must end exactly where it started.
    done = _run("train.py", "--cache", cache, "--run", second, "--steps", "2", "--init", initial, "--lr", "0",
                "--thick-fraction", "0.5", "--remap-fraction", "0.5", *TINY)
    assert done.returncode == 0, done.stderr
    a = torch.load(initial, weights_only=True)["network"]
    b = torch.load(os.path.join(second, "latest.pt"), weights_only=True)["network"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A resumed fine-tuning run continues from its checkpoint and no longer needs the --init file.
    resumable, moved = str(tmp_path / "resumable"), str(tmp_path / "moved.pt")
    shutil.copy(initial, moved)
    options = ["--cache", cache, "--run", resumable, "--steps", "3", "--init", moved, *TINY]
    assert "run again to resume" in _run("train.py", "--max-minutes", "1e-9", *options).stdout
    os.remove(moved)
    again = _run("train.py", *options)
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr
    assert len(_losses(resumable)) == 3
    wider = [value if value != "4,8" else "8,8" for value in TINY]
    refused = _run("train.py", "--cache", cache, "--run", str(tmp_path / "third"), "--steps", "1",
                   "--init", initial, *wider)
    assert refused.returncode != 0 and "--init" in refused.stderr
    # The grid is not part of the weights: fine-tuning on a finer grid starts from the same weights.
    finer = [value if value != "16,24,24" else "24,32,32" for value in TINY]
    done = _run("train.py", "--cache", cache, "--run", str(tmp_path / "finer"), "--steps", "1",
                "--init", initial, "--lr", "0", *finer)
    assert done.returncode == 0, done.stderr
    c = torch.load(str(tmp_path / "finer" / "latest.pt"), weights_only=True)
    assert c["config"]["grid"] == [24, 32, 32]
    assert all(torch.equal(a[k], c["network"][k]) for k in a)


def test_export_and_sharpness_read_checkpoints_and_weights_files(cache, tmp_path):
    """A run's checkpoint exported as a weights file loads in the engine with the same weights; the
    weights file works for --init, and the sharpness script reads both kinds of file."""
    from fmsam.weights import load_model

    run, exported = str(tmp_path / "run"), str(tmp_path / "exported.pt")
    assert _run("train.py", "--cache", cache, "--run", run, "--steps", "4", *TINY).returncode == 0
    done = _run("export_model.py", "--checkpoint", os.path.join(run, "best.pt"), "--out", exported,
                "--no-manifest")
    assert done.returncode == 0, done.stderr
    assert "step 4" in done.stdout
    network, config = load_model(exported)  # checks the written SHA-256 too
    trained = torch.load(os.path.join(run, "best.pt"), weights_only=True)["network"]
    assert all(torch.equal(trained[k], v) for k, v in network.state_dict().items())
    assert config["fine_channels"] == [4, 8]
    # Inference settings stored with an exported model: output smoothing and a finer network grid.
    finer = str(tmp_path / "finer.pt")
    done = _run("export_model.py", "--checkpoint", os.path.join(run, "best.pt"), "--out", finer,
                "--no-manifest", "--output-smoothing", "0.5", "--grid", "24,32,32")
    assert done.returncode == 0, done.stderr
    finer_config = load_model(finer)[1]
    assert finer_config["grid"] == [24, 32, 32] and finer_config["training_grid"] == [16, 24, 24]
    assert finer_config["output_smoothing"] == 0.5
    # A weights file exported again (e.g. a finished run's weights with the bundled settings): the
    # same weights, the new settings, and no step to report.
    again = str(tmp_path / "again.pt")
    done = _run("export_model.py", "--checkpoint", exported, "--out", again, "--no-manifest",
                "--output-smoothing", "1.3", "--grid", "24,32,32")
    assert done.returncode == 0 and "no step recorded" in done.stdout, done.stderr
    again_network, again_config = load_model(again)
    assert all(torch.equal(trained[k], v) for k, v in again_network.state_dict().items())
    assert again_config["output_smoothing"] == 1.3 and again_config["grid"] == [24, 32, 32]
    # Exported again from a file that already has an inference grid: the training grid stays the
    # real one; smoothing 0 clears a stored smoothing.
    third = str(tmp_path / "third.pt")
    done = _run("export_model.py", "--checkpoint", finer, "--out", third, "--no-manifest",
                "--output-smoothing", "0", "--grid", "32,40,40")
    assert done.returncode == 0, done.stderr
    third_config = load_model(third)[1]
    assert third_config["training_grid"] == [16, 24, 24] and third_config["grid"] == [32, 40, 40]
    assert third_config["output_smoothing"] == 0 and "network_passes" not in third_config
    # Fast mode's network passes: stored with the model, kept when the file is exported again.
    iterated = str(tmp_path / "iterated.pt")
    done = _run("export_model.py", "--checkpoint", third, "--out", iterated, "--no-manifest", "--network-passes", "2")
    assert done.returncode == 0, done.stderr
    assert load_model(iterated)[1]["network_passes"] == 2
    kept = str(tmp_path / "kept.pt")
    done = _run("export_model.py", "--checkpoint", iterated, "--out", kept, "--no-manifest", "--output-smoothing", "0.8")
    assert done.returncode == 0, done.stderr
    assert load_model(kept)[1]["network_passes"] == 2 and load_model(kept)[1]["output_smoothing"] == 0.8
    refused = str(tmp_path / "refused.pt")
    done = _run("export_model.py", "--checkpoint", iterated, "--out", refused, "--no-manifest", "--network-passes", "7")
    assert done.returncode == 2 and "'network_passes' is 7" in done.stderr and not os.path.exists(refused)
    tuned = str(tmp_path / "tuned")
    done = _run("train.py", "--cache", cache, "--run", tuned, "--steps", "1", "--init", exported, *TINY)
    assert done.returncode == 0, done.stderr
    out = str(tmp_path / "sharpness")
    done = _run("sharpness.py", "--cache", cache, "--models", "checkpoint=" + os.path.join(run, "best.pt"),
                "weights=" + exported, "--out", out, "--pairs", "1", "--directions", "1", "--points", "3")
    assert done.returncode == 0, done.stderr
    with open(out + ".csv") as handle:
        rows = list(csv.DictReader(handle))
    curves = {name: [(r["direction"], r["alpha"], r["loss"]) for r in rows if r["model"] == name]
              for name in ("checkpoint", "weights")}
    assert len(curves["checkpoint"]) == 3
    assert curves["checkpoint"] == curves["weights"]  # the same weights, read from either file


def test_export_keeps_the_bundled_record_only_for_the_bundled_weights(cache, tmp_path, monkeypatch, capsys):
    """Exporting the bundled model's weights again (another inference setting, from a copy of the
    file) keeps the manifest's training step and validation Dice; other weights get none. The
    manifest ends with a newline."""
    import export_model

    run = str(tmp_path / "run")
    assert _run("train.py", "--cache", cache, "--run", run, "--steps", "2", *TINY).returncode == 0
    folder = tmp_path / "weights"
    folder.mkdir()
    bundled = str(folder / "bundled.pt")
    assert export_model.main(["--checkpoint", os.path.join(run, "best.pt"), "--out", bundled, "--no-manifest"]) == 0
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"file": "bundled.pt", "training_step": 1234, "training_validation_dice": 0.5}))
    monkeypatch.setattr(export_model, "MANIFEST", str(manifest))
    copy = str(tmp_path / "copy.pt")
    shutil.copy(bundled, copy)
    assert export_model.main(["--checkpoint", copy, "--out", str(folder / "two_passes.pt"), "--network-passes", "2"]) == 0
    written = json.loads(manifest.read_text())
    assert manifest.read_text().endswith("}\n")
    assert written["file"] == "two_passes.pt" and written["config"]["network_passes"] == 2
    assert (written["training_step"], written["training_validation_dice"]) == (1234, 0.5)
    # Other weights (one more training step): no record, and the manifest says nothing of one.
    tuned = str(tmp_path / "tuned")
    assert _run("train.py", "--cache", cache, "--run", tuned, "--steps", "1", "--init", bundled, *TINY).returncode == 0
    other = str(tmp_path / "other.pt")
    assert export_model.main(["--checkpoint", os.path.join(tuned, "latest.pt"), "--out", other, "--no-manifest"]) == 0
    capsys.readouterr()
    assert export_model.main(["--checkpoint", other, "--out", str(folder / "other_bundled.pt")]) == 0
    assert "no step recorded" in capsys.readouterr().out
    written = json.loads(manifest.read_text())
    assert written["file"] == "other_bundled.pt" and "training_step" not in written


# -- the trainer under a Slicer-like launch --------------------------------------------------------
#: Runs a script the way ``Slicer --no-main-window --python-script SCRIPT ARGS`` does: ``sys.argv``
#: is the script and what followed Slicer's ``--ignore-rest``, the script's folder is put first on
#: ``sys.path`` (CTK's ``ctkAbstractPythonManager::executeFile``), and the file is executed as
#: ``__main__``. A SystemExit ends Slicer with its code; any other exception, or a script that just
#: returns, leaves a window-less Slicer running forever (exit codes 99 and 98 here).
SLICER_LIKE = """
import os, runpy, sys, traceback
script, arguments, block_torch = sys.argv[1], sys.argv[2:], %r
if block_torch:
    sys.modules["torch"] = None   # a Slicer without the PyTorch extension
sys.argv = [script] + arguments
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.exit(99)
sys.exit(98)
"""


def _run_like_slicer(*args, block_torch=False):
    return subprocess.run([sys.executable, "-c", SLICER_LIKE % block_torch,
                           os.path.join(TRAINING, "train.py")] + list(args),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_under_slicer_help_and_arguments_reach_the_trainer(cache, tmp_path):
    shown = _run_like_slicer("--ignore-rest", "--help")
    assert shown.returncode == 0 and "--optimizer" in shown.stdout and "--cache" in shown.stdout
    run = str(tmp_path / "run")
    done = _run_like_slicer("--ignore-rest", "--cache", cache, "--run", run, "--steps", "2",
                            "--optimizer", "adam", "--seed", "7", *TINY)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(run, "config.json")) as handle:
        recorded = json.load(handle)
    assert recorded["optimizer"] == "adam" and recorded["seed"] == 7 and recorded["steps"] == 2
    assert len(_losses(run)) == 2


def test_under_slicer_every_failure_ends_the_process_with_a_non_zero_code(tmp_path):
    bad_arguments = _run_like_slicer("--ignore-rest", "--run", str(tmp_path / "run"))  # no --cache
    assert bad_arguments.returncode == 2 and "--cache" in bad_arguments.stderr
    missing_cache = _run_like_slicer("--ignore-rest", "--cache", str(tmp_path / "none"), "--run",
                                     str(tmp_path / "run"), *TINY)
    assert missing_cache.returncode == 1, (missing_cache.returncode, missing_cache.stderr)
    assert "train.py: error: FileNotFoundError" in missing_cache.stderr
    no_torch = _run_like_slicer("--ignore-rest", "--help", block_torch=True)
    assert no_torch.returncode == 1, (no_torch.returncode, no_torch.stderr)
    assert "install the PyTorch extension" in no_torch.stderr
