"""The demo generator's corpus: the docstrings of the Python standard library, which every machine with
Python has. They are read from the source files with `ast` (no module is imported, so nothing runs)."""

from __future__ import annotations

import ast
import logging
import random
import sysconfig
import warnings
from pathlib import Path

from export.tokenization import EOS

logger = logging.getLogger(__name__)

# Tests, demos and vendored packages hold few docstrings worth learning from.
SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_docstrings(max_chars: int | None = None) -> list[str]:
    """Distinct module, class and function docstrings of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if SKIP.intersection(path.relative_to(root).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old sources
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40 and EOS not in doc:
                    documents.append(doc)
                    size += len(doc)
        if max_chars is not None and size >= max_chars:
            break
    documents = list(dict.fromkeys(documents))  # the same docstring is often inherited or copied
    # A fixed shuffle, so that the held-out tail is not just the last modules of the alphabet.
    random.Random(0).shuffle(documents)
    logger.info("collected %d docstrings (%d characters) from %s", len(documents), size, root)
    return documents
