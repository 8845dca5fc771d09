"""Errors vlmkit raises on purpose.

Every message is one line that names the thing at fault and how to fix it; the CLI prints it as
``error: <message>`` and exits non-zero, without a traceback.
"""


def printable(text: str) -> str:
    r"""``text`` safe to print on one terminal line: newlines, tabs and other control characters
    (a file name holding ``ESC[2J`` would clear the screen) written as ``\n``, ``\t``, ``\xNN``."""
    return "".join(_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if _is_control(c) else c) for c in text)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _is_control(char: str) -> bool:
    return ord(char) < 32 or 127 <= ord(char) < 160


class VlmkitError(Exception):
    """Base class for every error vlmkit raises on purpose (bad input, missing plugin, ...)."""


class PluginError(VlmkitError):
    """A plugin is unknown, broken, or clashes with another plugin."""


class ConfigError(VlmkitError):
    """A configuration value or file is malformed."""


class ArtifactError(VlmkitError):
    """A folder is not a vlmkit model artifact, or is of the wrong kind."""


class DataError(VlmkitError):
    """An image or dataset cannot be read."""


class ExportError(VlmkitError):
    """The model could not be exported (the exporter failed, or the result does not match)."""


class WriteError(VlmkitError):
    """A file or folder could not be written: the disk is full, it is read-only, a file is in the way."""


class TrainingDiverged(VlmkitError):
    """The loss, the gradients or the trained weights stopped being finite numbers (NaN or inf)."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training diverged at step {step}: {what}")
        self.step, self.what = step, what


class VlmkitWarning(UserWarning):
    """Base class of vlmkit's warnings; the CLI prints them as one ``warning: ...`` line."""
