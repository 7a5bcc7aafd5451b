"""Checking the arguments of :func:`fmsam.register` before any work is done.

Each check raises :class:`InputError` with a message that says what was given and what is
accepted, so a wrong type or value never surfaces later as an error from deep inside SimpleITK or
PyTorch.
"""
import numbers
import os

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .options import (CONTRAST_MATCHING, DEFAULT_SLICE_REFINEMENT, DEVICES, MAX_IO_STEPS, MODALITIES,
                      SLICE_REFINEMENT)


def _given(value):
    """How a value is named in a message: its repr for plain values (cut at 80 characters), its
    type otherwise (an array's repr would be long and say little)."""
    if value is None or isinstance(value, (str, bytes, numbers.Number, tuple, list, dict)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return "a %s.%s" % (type(value).__module__, type(value).__qualname__)


def check_image(value, name, optional=False):
    """An image argument: a path (str or os.PathLike) or a SimpleITK image (or None if optional)."""
    if value is None and optional:
        return
    if isinstance(value, sitk.Image) or isinstance(value, (str, os.PathLike)):
        return
    hint = ""
    if type(value).__module__ in ("numpy", "torch"):
        hint = " (wrap an array with SimpleITK.GetImageFromArray and set its spacing, origin and direction)"
    raise InputError("%s must be a file path (str or os.PathLike) or a SimpleITK image%s, not %s%s"
                     % (name, " or None" if optional else "", _given(value), hint))


def check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise InputError("%s must be one of %s, not %s" % (name, ", ".join(repr(c) for c in choices),
                                                          _given(value)))


def check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise InputError("%s must be True or False, not %s" % (name, _given(value)))


def check_io_steps(value):
    """Instance-optimisation steps: an integer from 0 to :data:`MAX_IO_STEPS` (not a bool, float
    or string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= value <= MAX_IO_STEPS:
        raise InputError("io_steps must be an integer from 0 to %d, not %s" % (MAX_IO_STEPS, _given(value)))


def check_modality(value):
    """'auto', 'mr' or 'ct' for both images, or a (fixed, moving) pair of them."""
    pair = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value,)
    if not all(isinstance(v, str) and v in MODALITIES for v in pair):
        raise InputError("modality must be one of %s or a (fixed, moving) pair of them, not %s"
                         % (", ".join(repr(m) for m in MODALITIES), _given(value)))


def check_device(value):
    """A device name; 'cuda' also needs a usable GPU now (this imports PyTorch)."""
    check_choice(value, "device", DEVICES)
    if value == "cuda":
        from .inference import cuda_usable

        if not cuda_usable():
            raise InputError("device 'cuda' was requested but no usable CUDA GPU was found "
                             "(use 'auto' or 'cpu')")


def check_weights(weights, model):
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise InputError("weights must be a file path (str or os.PathLike) or None, not %s" % _given(weights))
    if weights is not None and model is not None:
        raise InputError("give weights or model, not both")


def check_model(model):
    """A ``(network, config)`` pair as :func:`fmsam.weights.load_model` returns: a torch module with
    finite parameters and a valid config."""
    if model is None:
        return
    import sys

    torch = sys.modules.get("torch")  # a model can only exist once PyTorch is imported
    if (not isinstance(model, (tuple, list)) or len(model) != 2 or torch is None
            or not isinstance(model[0], torch.nn.Module) or not isinstance(model[1], dict)):
        raise InputError("model must be a (network, config) pair as fmsam.weights.load_model returns, "
                         "not %s" % _given(model))
    from .weights import check_finite_parameters, validate_config

    source = getattr(model[0], "fmsam_weights", {}).get("file") or "of the model given"
    validate_config(model[1], source)
    check_finite_parameters(model[0], source)


def check_progress(progress):
    if progress is not None and not callable(progress):
        raise InputError("progress must be a callable progress(stage, fraction) or None, not %s"
                         % _given(progress))


def check_register_arguments(fixed, moving, fixed_labels, moving_labels, prealign, io_steps, device,
                             weights, modality, progress, model, contrast_matching, allow_unverified,
                             slice_refinement=DEFAULT_SLICE_REFINEMENT):
    """Check every argument of :func:`fmsam.pipeline.register` (see there) before any work."""
    check_image(fixed, "fixed")
    check_image(moving, "moving")
    check_image(fixed_labels, "fixed_labels", optional=True)
    check_image(moving_labels, "moving_labels", optional=True)
    check_flag(prealign, "prealign")
    check_io_steps(io_steps)
    check_modality(modality)
    check_choice(contrast_matching, "contrast_matching", CONTRAST_MATCHING)
    check_choice(slice_refinement, "slice_refinement", SLICE_REFINEMENT)
    check_progress(progress)
    check_flag(allow_unverified, "allow_unverified")
    check_weights(weights, model)
    check_model(model)
    check_device(device)
