"""Is PyTorch usable here? Checked before a run so the user gets a message, not a traceback.

Importing this package never imports torch: the module must load in a Slicer without PyTorch and
offer to install it (through the PyTorch extension, which picks the right CUDA build).
"""
import numpy as np

MISSING = ("PyTorch is not installed in Slicer's Python. Install it through the PyTorch extension "
           "(Extensions Manager > PyTorch, then the PyTorch Utils module), or let this module do it "
           "for you.")
NUMPY_MISMATCH = ("PyTorch %s was built for NumPy 1.x, but this Slicer has NumPy %s, so PyTorch cannot "
                  "exchange arrays with NumPy. Reinstall PyTorch 2.3 or newer through the PyTorch Utils "
                  "module (Force reinstall), then restart Slicer.")
MINIMUM_TORCH = "2.0"


def torch_problem():
    """``None`` when PyTorch can run the engine, otherwise a message saying what is wrong and how
    to fix it."""
    try:
        import torch
    except ImportError:
        return MISSING
    except Exception as error:  # a broken install fails in many ways; say which
        return "PyTorch is installed but cannot be imported (%s: %s)." % (type(error).__name__, error)
    try:
        torch.from_numpy(np.zeros(2, dtype=np.float32)).sum()
    except RuntimeError as error:
        if "numpy" in str(error).lower():
            return NUMPY_MISMATCH % (torch.__version__, np.__version__)
        raise
    major_minor = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor < tuple(int(part) for part in MINIMUM_TORCH.split(".")):
        return "PyTorch %s is too old; FM-SAM needs PyTorch %s or newer." % (torch.__version__, MINIMUM_TORCH)
    return None


def cuda_usable():
    """True when a CUDA GPU can run the model (False without PyTorch)."""
    if torch_problem() is not None:
        return False
    from fmsam.inference import cuda_usable as engine_cuda_usable
    return engine_cuda_usable()
