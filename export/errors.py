"""The exporter's one exception type for bad input."""


class ExportError(Exception):
    """Bad input or a failed check. The message is one line that names the problem; the CLI prints it and
    exits with status 2 (no traceback)."""


class VerificationError(ExportError):
    """The exported graph does not match PyTorch within the bounds."""
