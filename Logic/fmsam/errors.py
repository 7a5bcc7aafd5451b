"""Errors the engine raises for problems the user can fix.

The command line turns :class:`InputError` into exit code 2 and :class:`RegistrationError` into
exit code 1, each with a one-line message; the Slicer module shows the same message in a dialog.
Anything else is a bug and keeps its traceback.
"""


def error_line(error):
    """The last line of an exception's message (SimpleITK's say where, then what), or its type."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


class InputError(ValueError):
    """An input (image, label map, transform or weights file) cannot be used as given."""


class Cancelled(RuntimeError):
    """The caller asked a running registration to stop (raised from a progress callback)."""


class RegistrationError(RuntimeError):
    """The inputs were accepted but no usable result came out (e.g. a non-finite displacement
    field), or a result could not be written; nothing was written."""
