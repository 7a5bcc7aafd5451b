"""FM-SAM registration engine: a uniGradICON-style registration foundation model, trained with
Sharpness-Aware Minimization or Adam (the bundled model: see weights/MODEL_CARD.md).

Slicer-free; the Slicer module and the ``fmsam`` command line both call :func:`register`.

    >>> import fmsam
    >>> result = fmsam.register("fixed.nii.gz", "moving.nii.gz")
    >>> result.report["folding_percent"], result.transform
"""
from .errors import Cancelled, InputError, RegistrationError

__version__ = "0.1.0"


def register(*args, **kwargs):
    """See :func:`fmsam.pipeline.register` (imported lazily so that ``import fmsam`` is cheap)."""
    from .pipeline import register as _register

    return _register(*args, **kwargs)


__all__ = ["register", "InputError", "RegistrationError", "Cancelled", "__version__"]
