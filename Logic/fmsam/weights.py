"""Model weights: loading with checksum verification and without unpickling arbitrary objects.

A weights file is a ``torch.save`` of ``{"config": dict, "state_dict": tensors}``, read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. The bundled
model's SHA-256 is recorded in ``weights/manifest.json``; a user's own weights file is verified
against ``<file>.sha256`` beside it. A file that cannot be verified (neither) is refused unless the
caller explicitly accepts it (``allow_unverified=True``, ``--allow-unverified-weights``). Every
loaded file's parameters must be finite and its config valid (:func:`validate_config`).
"""
import hashlib
import json
import numbers
import os

from .errors import InputError

#: Network architectures :func:`fmsam.networks.build_network` knows, with the channel keys each reads.
ARCHITECTURES = {"TwoStepNet": ("coarse_channels", "fine_channels"), "UNet": ("channels",)}
#: Limits of the config values the engine reads (anything outside is refused).
MAX_CHANNELS, MAX_LEVELS = 1024, 8
GRID_AXIS_RANGE, MAX_GRID_VOXELS = (8, 1024), 1 << 24
MAX_NCC_WINDOW, MAX_OUTPUT_SMOOTHING = 15, 10.0
#: Most network passes fast mode may make (``network_passes``; each costs one network estimate).
MAX_NETWORK_PASSES = 4

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
    try:
        with open(MANIFEST) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise InputError("the bundled model's manifest %s is unreadable (%s); reinstall fmsam"
                         % (MANIFEST, error)) from None
    if not isinstance(manifest, dict) or not all(key in manifest for key in ("file", "sha256", "config")):
        raise InputError("the bundled model's manifest %s lacks file, sha256 or config; reinstall fmsam"
                         % MANIFEST)
    return manifest


def bundled_config():
    """The bundled model's network options, read from the manifest: known without PyTorch, so a
    registration can start aligning images while PyTorch is still being imported."""
    return validate_config(_manifest()["config"], MANIFEST)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_list(config, key, length_range, value_range, source):
    """Check ``config[key]`` is a list of ints of a length and with values in the given ranges."""
    value = config[key]
    low, high = value_range
    if (not isinstance(value, (list, tuple)) or not length_range[0] <= len(value) <= length_range[1]
            or not all(_is_int(v) and low <= v <= high for v in value)):
        raise InputError("weights %s: config %r is %r; it must be a list of %d to %d integers from "
                         "%d to %d" % (source, key, value, length_range[0], length_range[1], low, high))


def _number(config, key, low, high, source):
    value = config[key]
    if not _is_number(value) or not low <= value <= high:
        raise InputError("weights %s: config %r is %r; it must be a number from %g to %g"
                         % (source, key, value, low, high))


def _orientation(config, source):
    """The axis layout code must name each of the three axes once (e.g. 'PSR', 'RAS')."""
    value = config["orientation"]
    letters = "RLAPSI"  # pairs of opposite directions: axis of a letter = its index // 2
    if (not isinstance(value, str) or len(value) != 3 or not all(c in letters for c in value)
            or sorted(letters.index(c) // 2 for c in value) != [0, 1, 2]):
        raise InputError("weights %s: config 'orientation' is %r; it must be a DICOM orientation "
                         "code of three capital letters, one of R/L, one of A/P and one of S/I "
                         "(e.g. 'PSR')" % (source, value))


def validate_config(config, source):
    """Return ``config`` (a weights file's network options) after checking every key the network
    and pipeline read: ``architecture`` and its channel lists, ``grid`` (network voxel budget, D, H,
    W), ``training_grid``, ``ncc_window`` (odd, voxels), ``gradicon_weight``, ``output_smoothing``
    (sigma in network voxels), ``network_passes`` (fast mode's passes, 1 to
    :data:`MAX_NETWORK_PASSES`) and ``orientation`` (DICOM code). Other keys are ignored. Raises
    :class:`InputError` naming ``source`` (the file) on the first bad value."""
    if not isinstance(config, dict):
        raise InputError("weights %s: config is a %s, not a dict" % (source, type(config).__name__))
    architecture = config.get("architecture", "TwoStepNet")
    if architecture not in ARCHITECTURES:
        raise InputError("weights %s: config 'architecture' is %r; known: %s"
                         % (source, architecture, ", ".join(ARCHITECTURES)))
    for key in ARCHITECTURES[architecture]:
        if key not in config:
            raise InputError("weights %s: config lacks %r (needed by a %s)" % (source, key, architecture))
        _int_list(config, key, (1, MAX_LEVELS), (1, MAX_CHANNELS), source)
    for key in ("grid", "training_grid"):
        if key in config:
            _int_list(config, key, (3, 3), GRID_AXIS_RANGE, source)
            voxels = config[key][0] * config[key][1] * config[key][2]
            if voxels > MAX_GRID_VOXELS:
                raise InputError("weights %s: config %r %r has %d voxels; at most %d are accepted"
                                 % (source, key, config[key], voxels, MAX_GRID_VOXELS))
    if "ncc_window" in config:
        window = config["ncc_window"]
        if not _is_int(window) or not 1 <= window <= MAX_NCC_WINDOW or window % 2 == 0:
            raise InputError("weights %s: config 'ncc_window' is %r; it must be an odd integer from "
                             "1 to %d" % (source, window, MAX_NCC_WINDOW))
    if "gradicon_weight" in config:
        _number(config, "gradicon_weight", 0.0, 1e3, source)
    if config.get("output_smoothing") is not None:
        _number(config, "output_smoothing", 0.0, MAX_OUTPUT_SMOOTHING, source)
    if "network_passes" in config:
        passes = config["network_passes"]
        if not _is_int(passes) or not 1 <= passes <= MAX_NETWORK_PASSES:
            raise InputError("weights %s: config 'network_passes' is %r; it must be an integer from 1 to %d"
                             % (source, passes, MAX_NETWORK_PASSES))
    if "orientation" in config:
        _orientation(config, source)
    return config


def bundled_weights():
    """``(path, expected sha256)`` of the model that ships with the package."""
    manifest = _manifest()
    return os.path.join(WEIGHTS_DIR, manifest["file"]), manifest["sha256"]


def expected_checksum(path):
    """The checksum a weights file must have: the manifest's for the bundled file, else the
    ``.sha256`` file beside it, else None (not verifiable)."""
    if os.path.isfile(MANIFEST):
        bundled_path, bundled_sha = bundled_weights()
        if os.path.realpath(path) == os.path.realpath(bundled_path):
            return bundled_sha
    sidecar = path + ".sha256"
    if not os.path.isfile(sidecar):
        return None
    with open(sidecar, "rb") as handle:
        words = handle.read(4096).split()
    checksum = words[0].decode("ascii", "replace").lower() if words else ""
    if len(checksum) != 64 or any(c not in "0123456789abcdef" for c in checksum):
        raise InputError("checksum file %s does not start with a SHA-256 (64 hexadecimal digits, as "
                         "sha256sum writes)" % sidecar)
    return checksum


def verify_checksum(path, allow_unverified=False):
    """Return ``{"file": absolute path, "sha256": its checksum, "verified": bool}`` for a weights
    file, or raise :class:`InputError` when it fails its expected checksum, or has none (and is not
    a byte-for-byte copy of the bundled model) and ``allow_unverified`` is false."""
    expected = expected_checksum(path)
    actual = sha256_of(path)
    if expected is not None and actual != expected:
        raise InputError("weights file %s is corrupt (SHA-256 does not match)" % path)
    if expected is None and os.path.isfile(MANIFEST) and actual == bundled_weights()[1]:
        expected = actual  # a copy of the bundled model, byte for byte
    if expected is None and not allow_unverified:
        raise InputError("weights file %s cannot be verified: it is not the bundled model and has no "
                         "%s beside it; write its checksum there (sha256sum FILE > FILE.sha256) if "
                         "you trust it, or pass --allow-unverified-weights (Python: "
                         "allow_unverified=True) to use it unchecked"
                         % (path, os.path.basename(path) + ".sha256"))
    return {"file": os.path.abspath(path), "sha256": actual, "verified": expected is not None}


def check_finite_parameters(network, source):
    """Raise :class:`InputError` unless every parameter and buffer of ``network`` is finite."""
    import torch

    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError("weights %s hold non-finite values (NaN or infinite): %d of the %d values "
                             "of %s; the model is damaged" % (source, bad, tensor.numel(), name))


def load_model(path=None, device="cpu", allow_unverified=False):
    """Return ``(network in eval mode, config)`` from ``path`` (default: the bundled model).

    Raises :class:`InputError` when the file is missing, fails its checksum, cannot be verified
    (unless ``allow_unverified``), is not a weights file of this package, has an invalid config or
    non-finite parameters. The network carries ``fmsam_weights`` (see :func:`verify_checksum`),
    which the report records.
    """
    import torch  # here, not at the top: importing this module must not cost PyTorch's import

    from .networks import build_network

    path = bundled_weights()[0] if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("weights file not found: %s" % path)
    provenance = verify_checksum(path, allow_unverified)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        config, state = content["config"], content["state_dict"]
    except Exception as error:  # torch raises many types for foreign or truncated files
        raise _unreadable(path, error) from None
    validate_config(config, path)
    try:
        network = build_network(config)
        network.load_state_dict(state)
    except Exception as error:
        raise _unreadable(path, error) from None
    check_finite_parameters(network, path)
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    network.fmsam_weights = provenance
    return network.to(device), config


def _unreadable(path, error):
    text = str(error).strip()
    return InputError("unreadable weights file %s (%s)"
                      % (path, text.splitlines()[0] if text else type(error).__name__))


def read_state(path):
    """``(state dict, config dict, other entries)`` of a weights file or a training checkpoint.

    A checkpoint (``latest.pt``, ``best.pt`` of a training run) holds the state dict as ``network``
    and also ``optimizer``, ``step`` and ``best_dice`` (the other entries); a weights file holds it
    as ``state_dict``. Tensors are loaded on the CPU with ``torch.load(weights_only=True)``; nothing
    is verified (no checksum, no config check): for the trainer's own files, while
    :func:`load_model` is for running a model."""
    import torch

    content = torch.load(path, map_location="cpu", weights_only=True)
    state = content["network"] if "network" in content else content["state_dict"]
    others = {key: value for key, value in content.items() if key not in ("network", "state_dict", "config")}
    return state, dict(content.get("config", {})), others


def save_weights(path, network, config):
    """Write a weights file and its ``.sha256`` sidecar; returns the checksum."""
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save({"config": config, "state_dict": state}, path)
    checksum = sha256_of(path)
    with open(path + ".sha256", "w") as handle:
        handle.write("%s  %s\n" % (checksum, os.path.basename(path)))
    return checksum
