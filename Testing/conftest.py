"""Shared fixtures: the bundled sample pair, registered once per test session through the CLI."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "Logic"))
sys.path.insert(0, os.path.join(ROOT, "FMSAMRegistration"))
SAMPLE = os.path.join(ROOT, "Testing", "Data", "ixi_sample")


def sample(subject, kind="T1"):
    folder = "T1" if kind == "T1" else "labels"
    return os.path.join(SAMPLE, folder, "%s_%s.nii.gz" % (subject, kind))


FIXED, MOVING = "IXI012-HH-1211", "IXI013-HH-1212"


def file_digests(paths):
    import hashlib

    return {key: hashlib.sha256(open(path, "rb").read()).hexdigest() for key, path in paths.items()}


@pytest.fixture(scope="session")
def sample_paths():
    return {"fixed": sample(FIXED), "moving": sample(MOVING),
            "fixed_labels": sample(FIXED, "labels"), "moving_labels": sample(MOVING, "labels")}


@pytest.fixture(scope="session")
def inverted_moving(sample_paths, tmp_path_factory):
    """Path of the sample's moving T1 with tissue intensities reversed inside the head (T2-like;
    the background stays dark)."""
    import numpy as np
    import SimpleITK as sitk

    moving = sitk.ReadImage(sample_paths["moving"], sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(moving)
    scaled = np.clip(voxels / np.percentile(voxels, 99), 0, 1)
    inverted = sitk.GetImageFromArray(np.where(scaled > 0.05, 1.05 - scaled, 0.0).astype(np.float32) * 1000)
    inverted.CopyInformation(moving)
    path = str(tmp_path_factory.mktemp("inverted") / "inverted.nii.gz")
    sitk.WriteImage(inverted, path)
    return path


@pytest.fixture(scope="session")
def stripped_moving(sample_paths, tmp_path_factory):
    """Path of the sample's moving T1 skull-stripped: every voxel outside its brain labels set to 0
    (a brain alone, about a third of the head's foreground)."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(sample_paths["moving"], sitk.sitkFloat32)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(sample_paths["moving_labels"])) > 0
    stripped = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayFromImage(image), 0.0).astype(np.float32))
    stripped.CopyInformation(image)
    path = str(tmp_path_factory.mktemp("stripped") / "stripped.nii.gz")
    sitk.WriteImage(stripped, path)
    return path


@pytest.fixture(scope="session")
def input_digests_before(sample_paths):
    return file_digests(sample_paths)


@pytest.fixture(scope="session")
def registered_sample(tmp_path_factory, sample_paths, input_digests_before):
    """Output folder of ``fmsam register`` on the sample pair, with labels."""
    from fmsam.cli import main

    out = str(tmp_path_factory.mktemp("registered") / "out")
    code = main(["register", sample_paths["fixed"], sample_paths["moving"], "--out", out,
                 "--fixed-labels", sample_paths["fixed_labels"],
                 "--moving-labels", sample_paths["moving_labels"], "--device", "cpu"])
    assert code == 0
    return out


#: (k, j, i) shape of the small synthetic volumes: above the minimum size a registration accepts.
SMALL_SHAPE = (16, 18, 20)


def small_volume(shift=0.0):
    """A smooth blob (float32 array of SMALL_SHAPE, values 1 to 101), moved by ``shift`` of the
    half extent along k."""
    import numpy as np

    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SMALL_SHAPE], indexing="ij")
    return (np.exp(-3 * ((grid[0] - shift) ** 2 + grid[1] ** 2 + grid[2] ** 2)) * 100 + 1).astype(np.float32)


def write_small_pair(folder, suffix=".mha"):
    """Paths of two small volumes (1 mm voxels) a registration accepts, the second one shifted."""
    import SimpleITK as sitk

    paths = []
    for index, shift in enumerate((0.0, 0.15)):
        paths.append(os.path.join(str(folder), "image%d%s" % (index, suffix)))
        sitk.WriteImage(sitk.GetImageFromArray(small_volume(shift)), paths[-1])
    return paths


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory):
    return write_small_pair(tmp_path_factory.mktemp("small_pair"))


@pytest.fixture
def small_network_grid(monkeypatch):
    """The bundled model run on a 16x16x16 network grid (4096 voxels instead of 800 000), so that a
    registration of small volumes takes a fraction of a second: for tests of what surrounds it."""
    import fmsam.weights as weights

    bundled_config, load_model = weights.bundled_config, weights.load_model

    def small(config):
        return dict(config, grid=[16, 16, 16])

    def load_small(*args, **kwargs):
        network, config = load_model(*args, **kwargs)
        return network, small(config)

    monkeypatch.setattr(weights, "bundled_config", lambda: small(bundled_config()))
    # 16 x 16 x 16 whatever the images' voxels: no budget raised for images with many of them
    monkeypatch.setattr("fmsam.inference.NETWORK_VOXELS_PER_IMAGE_VOXEL", 0.0)
    monkeypatch.setattr("fmsam.inference.ACCURATE_NETWORK_VOXELS_PER_IMAGE_VOXEL", 0.0)
    monkeypatch.setattr(weights, "load_model", load_small)
