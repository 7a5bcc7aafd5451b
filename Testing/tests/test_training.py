"""The trainer: preparing data, a short run lowering the loss, exact resume, Slicer-style exit."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SAMPLE

TRAINING = os.path.join(ROOT, "Training")
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
