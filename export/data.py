"""Readers for labelled text (CSV, TSV, JSONL), tagged tokens (CoNLL) and plain-text corpora.

Labelled files: the text and label columns are named by options; when they are not given, common names are
tried (`text`, `sentence`, `review`, ... and `label`, `sentiment`, ...). A TSV or CSV whose first row does not
name the columns (AG News) is read as `text<sep>label` without a header when `--no-header` is given.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from export.errors import ExportError

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "utterance")
LABEL_COLUMNS = ("label", "sentiment", "labels", "class", "category", "target")
FORMATS = ("csv", "tsv", "jsonl")

# Some datasets hold long reviews; the csv module's default field limit (128 KiB) is too small for a few.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class LabelledData:
    texts: list[str]
    labels: list[int]  # index into names
    names: list[str]  # label names in index order
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if suffix in ("tsv", "tab"):
        return "tsv"
    if suffix == "csv":
        return "csv"
    raise ExportError(f"cannot tell the format of {path} from its extension; pass --format csv|tsv|jsonl")


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ExportError(f"{path}: unknown {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ExportError(
        f"{path}: no {what} column found among {', '.join(columns)}; name it with --{what}-column"
    )


def _read_rows(path: Path, fmt: str, header: bool) -> tuple[list[str], list[dict[str, object]]]:
    raw = _read_text(path, "data file", encoding="utf-8-sig")
    if fmt == "jsonl":
        rows: list[dict[str, object]] = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExportError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ExportError(f"{path}:{number}: not a JSON object")
            rows.append(row)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return columns, rows
    delimiter = "\t" if fmt == "tsv" else ","
    # TSV files such as SST-2 hold unbalanced quotes inside sentences: quotes mean nothing there.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(raw.splitlines(), delimiter=delimiter, quoting=quoting)
    table = [row for row in reader if row and any(cell.strip() for cell in row)]
    if len(table) < (2 if header else 1):
        raise ExportError(f"data file {path} has no rows{' under its header' if header else ''}")
    if header:
        columns, body = [c.strip() for c in table[0]], table[1:]
    else:
        width = max(len(row) for row in table)
        columns = ["text", "label"] if width == 2 else [f"column{i}" for i in range(width)]
        body = table
    rows = []
    for number, cells in enumerate(body, start=2 if header else 1):
        if len(cells) != len(columns):
            raise ExportError(f"{path}:{number}: {len(cells)} fields where the header has {len(columns)}")
        rows.append(dict(zip(columns, cells)))
    return columns, rows


def read_labelled(
    path: Path,
    *,
    fmt: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    header: bool = True,
    label_names: list[str] | None = None,
) -> LabelledData:
    """Reads a labelled file. Label names are kept as written (numbers too, as strings: "0", "1") and sorted,
    numerically when every label is an integer; `label_names` renames them in that order."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ExportError(f"unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
    columns, rows = _read_rows(path, fmt, header)
    if not rows:
        raise ExportError(f"data file {path} has no rows")
    text_key = _pick(columns, text_column, TEXT_COLUMNS, "text", path)
    label_key = _pick(columns, label_column, LABEL_COLUMNS, "label", path)
    texts: list[str] = []
    raw_labels: list[str] = []
    for number, row in enumerate(rows, start=1):
        text, label = row.get(text_key), row.get(label_key)
        if text is None or label is None or not str(text).strip():
            raise ExportError(f"{path}: row {number} has no {text_key!r} or no {label_key!r}")
        texts.append(str(text).strip())
        raw_labels.append(str(label).strip())
    if len(set(raw_labels)) < 2:
        raise ExportError(f"{path}: a classifier needs at least two classes; found only {raw_labels[0]!r}")
    names = sorted_label_names(raw_labels)
    index = {name: i for i, name in enumerate(names)}
    if label_names is not None:
        # Renames in sorted order, e.g. SST-2's "0", "1" to "negative", "positive".
        if len(label_names) != len(names):
            raise ExportError(f"{path}: --label-names gives {len(label_names)} names for {len(names)} labels {names}")
        names = list(label_names)
    logger.info("read %d examples, %d classes from %s", len(texts), len(names), path)
    return LabelledData(texts, [index[label] for label in raw_labels], names, str(path))


@dataclass(frozen=True)
class TaggedData:
    sentences: list[list[str]]  # words
    tags: list[list[int]]  # per word, an index into names
    names: list[str]  # tag names in index order
    source: str

    def __len__(self) -> int:
        return len(self.sentences)


DOCSTART = "-DOCSTART-"


def read_conll(path: Path) -> TaggedData:
    """Reads a CoNLL-style file: one token a line, its tag in the last column (columns apart by tabs, or by
    spaces in a line without tabs, so that CoNLL-2003's `EU NNP B-NP B-ORG` and `EU<TAB>B-ORG` both read),
    a blank line between sentences, `-DOCSTART-` lines skipped. Tags are ordered as `tag_names` orders them."""
    raw = _read_text(path, "data file", encoding="utf-8-sig")
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    word_tags: list[str] = []
    for number, line in enumerate([*raw.splitlines(), ""], start=1):
        cells = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        cells = [c for c in cells if c]
        if cells and cells[0] == DOCSTART:
            cells = []
        if not cells:  # the end of a sentence
            if words:
                sentences.append(words)
                tags.append(word_tags)
            words, word_tags = [], []
            continue
        if len(cells) < 2:
            raise ExportError(f"{path}:{number}: token {cells[0]!r} has no tag (the tag is the last column)")
        words.append(cells[0])
        word_tags.append(cells[-1])
    if not sentences:
        raise ExportError(f"data file {path} has no sentences")
    names = tag_names([t for sentence in tags for t in sentence])
    if len(names) < 2:
        raise ExportError(f"{path}: a token classifier needs at least two tags; found only {names[0]!r}")
    index = {name: i for i, name in enumerate(names)}
    logger.info("read %d sentences, %d tokens, %d tags from %s", len(sentences), sum(map(len, sentences)), len(names), path)
    return TaggedData(sentences, [[index[t] for t in sentence] for sentence in tags], names, str(path))


def tag_names(tags: list[str]) -> list[str]:
    """Sorted, with "O" (outside any entity) first when present: label 0 is then "nothing here", as in
    Hugging Face's token-classification checkpoints."""
    distinct = set(tags)
    return (["O"] if "O" in distinct else []) + sorted(distinct - {"O"})


def sorted_label_names(labels: list[str]) -> list[str]:
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def read_corpus(path: Path) -> str:
    """Reads a UTF-8 text corpus; an empty one (only white space) is an error."""
    return _read_text(path, "corpus", encoding="utf-8")


def _read_text(path: Path, what: str, encoding: str) -> str:
    """The whole file as text; a missing, unreadable, non-UTF-8 or blank file is an ExportError naming it."""
    try:
        text = path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise ExportError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ExportError(f"{what} {path} is a folder") from None
    except UnicodeDecodeError as exc:
        raise ExportError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ExportError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not text.strip():
        raise ExportError(f"{what} {path} is empty")
    return text
