"""fmsam.register checks every argument before any work, and a progress callback's own exception
reaches the caller as itself."""
import numpy as np
import pytest
import torch

import fmsam
from fmsam.errors import InputError

from conftest import SMALL_SHAPE as SHAPE


BAD_ARGUMENTS = [
    ({"fixed": np.zeros(SHAPE)}, "fixed must be a file path (str or os.PathLike) or a SimpleITK image, "
                                 "not a numpy.ndarray (wrap an array with SimpleITK.GetImageFromArray"),
    ({"moving": torch.zeros(SHAPE)}, "moving must be a file path (str or os.PathLike) or a SimpleITK "
                                     "image, not a torch.Tensor"),
    ({"moving": None}, "moving must be a file path (str or os.PathLike) or a SimpleITK image, not None"),
    ({"fixed_labels": 3}, "fixed_labels must be a file path (str or os.PathLike) or a SimpleITK image or "
                          "None, not 3"),
    ({"io_steps": "5"}, "io_steps must be an integer from 0 to 2000, not '5'"),
    ({"io_steps": 1.5}, "io_steps must be an integer from 0 to 2000, not 1.5"),
    ({"io_steps": None}, "io_steps must be an integer from 0 to 2000, not None"),
    ({"io_steps": -1}, "io_steps must be an integer from 0 to 2000, not -1"),
    ({"io_steps": 2001}, "io_steps must be an integer from 0 to 2000, not 2001"),
    ({"io_steps": True}, "io_steps must be an integer from 0 to 2000, not True"),
    ({"modality": "xray"}, "modality must be one of 'auto', 'mr', 'ct' or a (fixed, moving) pair of "
                           "them, not 'xray'"),
    ({"modality": ("mr", "pet")}, "not ('mr', 'pet')"),
    ({"model": ("junk",)}, "model must be a (network, config) pair as fmsam.weights.load_model returns, "
                           "not ('junk',)"),
    ({"device": "gpu"}, "device must be one of 'auto', 'cpu', 'cuda', not 'gpu'"),
    ({"contrast_matching": "sometimes"}, "contrast_matching must be one of 'auto', 'on', 'off', not "
                                         "'sometimes'"),
    ({"slice_refinement": "on"}, "slice_refinement must be one of 'off', 'auto', not 'on'"),
    ({"prealign": "no"}, "prealign must be True or False, not 'no'"),
    ({"allow_unverified": 1}, "allow_unverified must be True or False, not 1"),
    ({"progress": "print"}, "progress must be a callable progress(stage, fraction) or None, not 'print'"),
    ({"weights": 42}, "weights must be a file path (str or os.PathLike) or None, not 42"),
]


@pytest.mark.parametrize("change,message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_work(small_pair, change, message):
    stages = []
    arguments = dict(fixed=small_pair[0], moving=small_pair[1],
                     progress=lambda stage, fraction: stages.append(stage))
    arguments.update(change)
    with pytest.raises(InputError) as raised:
        fmsam.register(**arguments)
    assert message in str(raised.value)
    assert stages == []  # not even the first stage began


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(small_pair, tmp_path, capsys):
    from fmsam.cli import main

    stages = []
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        fmsam.register(*small_pair, device="cuda", progress=lambda stage, fraction: stages.append(stage))
    assert stages == []
    out = tmp_path / "out"
    assert main(["register", small_pair[0], small_pair[1], "--out", str(out), "--device", "cuda",
                 "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0] and not out.exists()


def test_io_steps_above_the_limit_exit_2_at_once(small_pair, tmp_path, capsys):
    from fmsam.cli import main

    out = tmp_path / "out"
    assert main(["register", small_pair[0], small_pair[1], "--out", str(out), "--io-steps", "100000"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "fmsam: error: io_steps must be an integer from 0 to 2000, not 100000"
    assert captured.out == "" and not out.exists()  # no stage was printed


class _MyError(Exception):
    pass


@pytest.mark.parametrize("stage", ["affine", "network"])
@pytest.mark.parametrize("error", [_MyError("the callback's own"), fmsam.Cancelled("stop"),
                                   RuntimeError("the callback's, like SimpleITK's")])
def test_a_progress_callback_exception_comes_back_as_itself(small_pair, small_network_grid, stage, error):
    """In the affine stage the callback runs inside an ITK command, which swallows exceptions."""
    def progress(name, fraction):
        if name == stage and fraction > 0:  # affine: from the optimiser's iteration command
            raise error

    with pytest.raises(type(error)) as raised:
        fmsam.register(*small_pair, device="cpu", progress=progress)
    assert raised.value is error


def test_simpleitk_failing_in_the_affine_is_one_line_and_writes_nothing(small_pair, tmp_path, capsys,
                                                                        monkeypatch):
    """What ITK raises when it cannot align two images (here simulated: real cases depend on ITK's
    version and on the other stages) is a RegistrationError that says what to do."""
    import fmsam.pipeline as pipeline
    from fmsam.cli import main

    def itk_fails(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute: itkMatt.hxx:1:\n"
                           "ITK ERROR: Too many samples map outside moving image buffer: 0 / 10")

    monkeypatch.setattr(pipeline, "affine_prealign", itk_fails)
    out = tmp_path / "out"
    assert main(["register", small_pair[0], small_pair[1], "--out", str(out), "--quiet"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["fmsam: error: the affine pre-alignment failed on these images (ITK ERROR: Too many "
                     "samples map outside moving image buffer: 0 / 10); check that they show the same "
                     "anatomy, or register without it (--no-affine, prealign=False)"]
    assert not out.exists()


@pytest.mark.parametrize("option,message", [
    (["--io-steps", "1.5"], "argument --io-steps: invalid int value: '1.5'"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
])
def test_command_line_mistakes_are_one_line_too(small_pair, tmp_path, capsys, option, message):
    from fmsam.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["register", small_pair[0], small_pair[1], "--out", str(tmp_path / "out")] + option)
    captured = capsys.readouterr()
    assert raised.value.code == 2 and captured.out == ""
    assert captured.err.startswith("fmsam: error: " + message) and captured.err.count("\n") == 1
    assert captured.err.endswith("(see fmsam register --help)\n")
