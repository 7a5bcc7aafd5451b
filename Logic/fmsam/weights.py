"""Model weights: loading with checksum verification and without unpickling arbitrary objects.

A weights file is a ``torch.save`` of ``{"config": dict, "state_dict": tensors}``, read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. The bundled
model's SHA-256 is recorded in ``weights/manifest.json``; a user's own weights file is verified
against ``<file>.sha256`` when one lies beside it.
"""
import hashlib
import json
import os

from .errors import InputError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MANIFEST = os.path.join(WEIGHTS_DIR, "manifest.json")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest():
    if not os.path.isfile(MANIFEST):
        raise InputError("no bundled model in this installation (%s is missing); pass a weights "
                         "file" % MANIFEST)
    with open(MANIFEST) as handle:
        return json.load(handle)


def bundled_config():
    """The bundled model's network options, read from the manifest: known without PyTorch, so a
    registration can start aligning images while PyTorch is still being imported."""
    return _manifest()["config"]


def bundled_weights():
    """``(path, expected sha256)`` of the model that ships with the package."""
    manifest = _manifest()
    return os.path.join(WEIGHTS_DIR, manifest["file"]), manifest["sha256"]


def expected_checksum(path):
    """The checksum a weights file must have: the manifest's for the bundled file, else the
    ``.sha256`` file beside it, else None (not verifiable)."""
    if os.path.isfile(MANIFEST):
        bundled_path, bundled_sha = bundled_weights()
        if os.path.abspath(path) == os.path.abspath(bundled_path):
            return bundled_sha
    sidecar = path + ".sha256"
    if os.path.isfile(sidecar):
        with open(sidecar) as handle:
            return handle.read().split()[0]
    return None


def load_model(path=None, device="cpu"):
    """Return ``(network in eval mode, config)`` from ``path`` (default: the bundled model).

    Raises :class:`InputError` when the file is missing, fails its checksum, or is not a weights
    file of this package.
    """
    import torch  # here, not at the top: importing this module must not cost PyTorch's import

    from .networks import build_network

    path = bundled_weights()[0] if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("weights file not found: %s" % path)
    expected = expected_checksum(path)
    if expected is not None and sha256_of(path) != expected:
        raise InputError("weights file %s is corrupt (SHA-256 does not match)" % path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        config, state = content["config"], content["state_dict"]
        network = build_network(config)
        network.load_state_dict(state)
    except Exception as error:  # torch raises many types for foreign or truncated files
        raise InputError("unreadable weights file %s (%s)"
                         % (path, str(error).strip().splitlines()[0] if str(error).strip()
                            else type(error).__name__)) from None
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.to(device), config


def save_weights(path, network, config):
    """Write a weights file and its ``.sha256`` sidecar; returns the checksum."""
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save({"config": config, "state_dict": state}, path)
    checksum = sha256_of(path)
    with open(path + ".sha256", "w") as handle:
        handle.write("%s  %s\n" % (checksum, os.path.basename(path)))
    return checksum
