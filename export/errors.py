"""The exporter's one exception type for bad input, and the checks of checkpoint folders that raise it."""

from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """Bad input or a failed check. The message is one line that names the problem; the CLI prints it and
    exits with status 2 (no traceback)."""


class VerificationError(ExportError):
    """The exported graph does not match PyTorch within the bounds."""


def check_checkpoint_folder(folder: Path) -> None:
    """A Hugging Face checkpoint folder must exist and hold a config.json."""
    if not folder.is_dir():
        raise ExportError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ExportError(f"checkpoint folder {folder} has no config.json")


def checkpoint_load_error(folder: Path, exc: Exception) -> ExportError:
    """One line for whatever transformers raised (OSError, ValueError, KeyError...) on a bad folder."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExportError(f"cannot load checkpoint folder {folder}: {first}")
