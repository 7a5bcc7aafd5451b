"""Weights that cannot be trusted are refused: unverifiable, non-finite, or with a bad config; a
result that is not finite is an error, never a report of 0 % folding."""
import shutil

import numpy as np
import pytest
import torch

import fmsam
from fmsam.errors import InputError, RegistrationError
from fmsam.weights import bundled_weights, load_model, sha256_of


def _weights(folder, name, change_config=None, change_state=None, sidecar=True):
    """A copy of the bundled weights, its config or tensors changed, with a matching .sha256."""
    content = torch.load(bundled_weights()[0], map_location="cpu", weights_only=True)
    if change_config:
        change_config(content["config"])
    if change_state:
        change_state(content["state_dict"])
    path = str(folder / name)
    torch.save(content, path)
    if sidecar:
        with open(path + ".sha256", "w") as handle:
            handle.write(sha256_of(path) + "  " + name + "\n")
    return path


def _flip_bytes(path, fraction, seed=0):
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(seed)
    # tensor data only: past the first 4 kB (zip headers) and before the last (central directory)
    for position in rng.choice(np.arange(4096, len(data) - 4096), int(len(data) * fraction), replace=False):
        data[position] ^= 0x10
    with open(path, "wb") as handle:
        handle.write(bytes(data))


def _cli(argv, capsys):
    from fmsam.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_unverifiable_weights_are_refused_unless_explicitly_allowed(small_pair, tmp_path, capsys):
    copy = str(tmp_path / "copy.pt")
    shutil.copy(bundled_weights()[0], copy)
    network, _ = load_model(copy)  # the bundled model's bytes: known by the manifest
    assert network.fmsam_weights == {"file": copy, "sha256": bundled_weights()[1], "verified": True}
    tuned = _weights(tmp_path, "tuned.pt", change_state=lambda state: state["fine.head.bias"].add_(1e-3),
                     sidecar=False)
    with pytest.raises(InputError, match="cannot be verified"):
        load_model(tuned)
    network, _ = load_model(tuned, allow_unverified=True)
    assert network.fmsam_weights == {"file": tuned, "sha256": sha256_of(tuned), "verified": False}
    _flip_bytes(copy, 0.005)  # the damage a bad download does; no checksum says so
    with pytest.raises(InputError, match="cannot be verified.*copy.pt.sha256.*allow_unverified=True"):
        load_model(copy)
    fixed, moving = small_pair
    out = tmp_path / "out"
    code, lines = _cli(["register", fixed, moving, "--out", str(out), "--weights", copy], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fmsam: error: weights file " + copy)
    assert "cannot be verified" in lines[0] and "--allow-unverified-weights" in lines[0]
    assert not out.exists()
    with pytest.raises(InputError, match="cannot be verified"):
        fmsam.register(fixed, moving, weights=copy, device="cpu")


def test_the_allow_option_reaches_the_loader(small_pair, tmp_path, capsys):
    """With --allow-unverified-weights the checksum is skipped, and the next check speaks."""
    nan = _weights(tmp_path, "nan.pt", change_state=lambda state: state["fine.head.bias"].fill_(np.nan),
                   sidecar=False)
    fixed, moving = small_pair
    code, lines = _cli(["register", fixed, moving, "--out", str(tmp_path / "out"), "--weights", nan,
                        "--allow-unverified-weights"], capsys)
    assert code == 2 and len(lines) == 1 and "non-finite values" in lines[0], lines
    with pytest.raises(InputError, match="non-finite"):
        fmsam.register(fixed, moving, weights=nan, device="cpu", allow_unverified=True)


def test_weights_with_nan_parameters_are_refused_even_with_a_checksum(tmp_path):
    path = _weights(tmp_path, "nan.pt", change_state=lambda state: state["coarse.head.weight"].view(-1)[7:9]
                    .fill_(float("nan")))
    with pytest.raises(InputError, match=r"nan.pt hold non-finite values .*: 2 of the \d+ values of "
                                         r"coarse.head.weight"):
        load_model(path)


BAD_CONFIGS = [
    ({"orientation": "XYZ"}, "'orientation' is 'XYZ'"),
    ({"orientation": "PSP"}, "'orientation' is 'PSP'"),
    ({"grid": [0, 100, 100]}, "'grid' is [0, 100, 100]"),
    ({"grid": [80, 100]}, "'grid' is [80, 100]"),
    ({"grid": [1024, 1024, 1024]}, "1073741824 voxels"),
    ({"ncc_window": 4}, "'ncc_window' is 4"),
    ({"output_smoothing": "1.3"}, "'output_smoothing' is '1.3'"),
    ({"output_smoothing": float("nan")}, "'output_smoothing' is nan"),
    ({"network_passes": 0}, "'network_passes' is 0"),
    ({"network_passes": 5}, "'network_passes' is 5"),
    ({"network_passes": 2.0}, "'network_passes' is 2.0"),
    ({"architecture": "ResNet"}, "'architecture' is 'ResNet'"),
    ({"fine_channels": [8, -16, 32, 64]}, "'fine_channels' is [8, -16, 32, 64]"),
    ({"coarse_channels": None}, "'coarse_channels' is None"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_weights_config_is_validated(tmp_path, change, message):
    path = _weights(tmp_path, "bad_config.pt", change_config=lambda config: config.update(change))
    with pytest.raises(InputError) as raised:
        load_model(path)
    assert str(raised.value).startswith("weights %s: config" % path) and message in str(raised.value)


def test_a_given_model_is_checked_like_a_loaded_one(small_pair, tmp_path):
    network, config = load_model()
    with pytest.raises(InputError, match="'orientation' is 'up'"):
        fmsam.register(*small_pair, model=(network, dict(config, orientation="up")))
    with pytest.raises(InputError, match="model must be a \\(network, config\\) pair.*\\('junk',\\)"):
        fmsam.register(*small_pair, model=("junk",))


class _NaNNetwork(torch.nn.Module):
    """Finite parameters, NaN output: what overflowing activations give."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, fixed, moving):
        return torch.full((fixed.shape[0], 3) + tuple(fixed.shape[2:]), float("nan")) * self.scale


def test_a_non_finite_field_is_an_error_not_a_result(small_pair, tmp_path):
    config = dict(load_model()[1], grid=[16, 16, 16])
    with pytest.raises(RegistrationError, match=r"non-finite displacement field \(\d+ of \d+ values"):
        fmsam.register(*small_pair, model=(_NaNNetwork(), config), device="cpu")


def test_a_jacobian_beyond_float32_is_an_error_not_a_result(small_pair, small_network_grid, monkeypatch):
    """A finite field can still have a determinant float32 cannot hold (written as inf, and not
    JSON in the report)."""
    import fmsam.pipeline as pipeline

    monkeypatch.setattr(pipeline, "transform_jacobian",
                        lambda transform, grid: np.full(grid.GetSize()[::-1], 1e39))
    with pytest.raises(RegistrationError, match=r"non-finite Jacobian determinant \((\d+) of \1 values"):
        fmsam.register(*small_pair, device="cpu", prealign=False)


def test_a_report_figure_that_is_not_finite_is_an_error(small_pair, small_network_grid, monkeypatch):
    import fmsam.pipeline as pipeline

    monkeypatch.setattr(pipeline, "deformable_gain", lambda *images: (0.5, float("nan"), None))
    with pytest.raises(RegistrationError, match="the registration's figures mi_registered are not finite"):
        fmsam.register(*small_pair, device="cpu", prealign=False)


def test_overflowing_weights_exit_1_and_write_nothing(small_pair, tmp_path, capsys):
    """Finite but huge weights overflow to a NaN field: exit 1, one line, no output folder."""
    def huge(state):
        for key, tensor in state.items():
            if key.endswith("weight"):
                tensor.mul_(1e30)

    # a small network grid (a valid config) keeps the registration short
    path = _weights(tmp_path, "huge.pt", change_state=huge,
                    change_config=lambda config: config.update(grid=[16, 16, 16]))
    fixed, moving = small_pair
    out = tmp_path / "out"
    code, lines = _cli(["register", fixed, moving, "--out", str(out), "--weights", path, "--device", "cpu"],
                       capsys)
    assert code == 1 and len(lines) == 1 and "non-finite displacement field" in lines[0], lines
    assert path in lines[0] and not out.exists()


@pytest.mark.parametrize("content", [b"", b"not-a-checksum  copy.pt\n", b"\xff\xfe"])
def test_a_malformed_checksum_file_is_an_error_not_a_traceback(tmp_path, content):
    copy = str(tmp_path / "copy.pt")
    shutil.copy(bundled_weights()[0], copy)
    with open(copy + ".sha256", "wb") as handle:
        handle.write(content)
    with pytest.raises(InputError, match="checksum file .*copy.pt.sha256 does not start with a SHA-256"):
        load_model(copy)
    with open(copy + ".sha256", "w") as handle:  # sha256sum's own format, upper case accepted
        handle.write(sha256_of(copy).upper() + "  copy.pt\n")
    assert load_model(copy)[0].fmsam_weights["verified"] is True


@pytest.mark.parametrize("content", ['{"file": "x.pt"', '{"file": "x.pt"}', "[]"])
def test_a_damaged_manifest_is_one_error(small_pair, tmp_path, monkeypatch, content):
    import fmsam.weights as weights

    (tmp_path / "manifest.json").write_text(content)
    monkeypatch.setattr(weights, "MANIFEST", str(tmp_path / "manifest.json"))
    with pytest.raises(InputError, match="the bundled model's manifest .* reinstall fmsam"):
        fmsam.register(*small_pair, device="cpu")
