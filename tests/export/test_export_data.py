"""The labelled-data readers (CSV, TSV, JSONL) and the corpus reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.data import read_corpus, read_labelled
from export.errors import ExportError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_imdb_style_csv_with_quoted_commas(tmp_path: Path) -> None:
    path = write(
        tmp_path / "imdb.csv",
        'review,sentiment\n"Great film, truly.",positive\nAwful.,negative\n'
        '"She said ""wow"", twice",positive\n',
    )
    data = read_labelled(path)
    assert data.names == ["negative", "positive"]
    assert data.texts == ["Great film, truly.", "Awful.", 'She said "wow", twice']
    assert data.labels == [1, 0, 1]


def test_sst2_style_tsv_keeps_stray_quotes(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nit 's a \" charming journey\t1\nflat , dull\t0\n")
    data = read_labelled(path)
    assert data.texts == ["it 's a \" charming journey", "flat , dull"]
    assert data.names == ["0", "1"] and data.labels == [1, 0]


def test_integer_labels_sort_numerically_and_can_be_renamed(tmp_path: Path) -> None:
    rows = "".join(f"text {i}\t{label}\n" for i, label in enumerate([10, 2, 1, 2]))
    path = write(tmp_path / "x.tsv", "text\tlabel\n" + rows)
    assert read_labelled(path).names == ["1", "2", "10"]
    renamed = read_labelled(path, label_names=["one", "two", "ten"])
    assert renamed.names == ["one", "two", "ten"] and renamed.labels == [2, 1, 0, 1]


def test_jsonl_with_named_columns_and_many_classes(tmp_path: Path) -> None:
    rows = [
        {"body": f"headline {i} ✓ 東京", "topic": topic, "id": i}
        for i, topic in enumerate(["World", "Sports", "Business", "Sci/Tech", "Sports"])
    ]
    path = write(tmp_path / "news.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    data = read_labelled(path, text_column="body", label_column="topic")
    assert data.names == ["Business", "Sci/Tech", "Sports", "World"]
    assert [data.names[y] for y in data.labels] == ["World", "Sports", "Business", "Sci/Tech", "Sports"]
    assert data.texts[0] == "headline 0 ✓ 東京"


def test_headerless_tsv_like_ag_news(tmp_path: Path) -> None:
    path = write(tmp_path / "ag.tsv", "Stocks rally\tBusiness\nTeam wins\tSports\n")
    data = read_labelled(path, header=False)
    assert data.texts == ["Stocks rally", "Team wins"] and data.names == ["Business", "Sports"]


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("missing.csv", None, {}, "does not exist"),
        ("empty.csv", "", {}, "is empty"),
        ("blank.tsv", "\n  \n", {}, "is empty"),
        ("header_only.csv", "text,label\n", {}, "has no rows"),
        ("cols.csv", "text,label\na,x\nb,y\n", {"text_column": "review"}, "unknown text column 'review'"),
        ("cols2.csv", "text,label\na,x\nb,y\n", {"label_column": "stars"}, "unknown label column 'stars'"),
        ("guess.csv", "foo,bar\na,x\n", {}, "no text column"),
        ("one.csv", "text,label\na,pos\nb,pos\n", {}, "at least two classes"),
        ("bad.jsonl", '{"text": "a", "label": 1}\nnot json\n', {}, "bad.jsonl:2: not a JSON object"),
        ("ragged.csv", "text,label\na,x,extra\n", {}, "3 fields where the header has 2"),
        ("data.xml", "<x/>", {}, "cannot tell the format"),
        ("latin1.csv", None, {}, "not UTF-8"),
    ],
)
def test_bad_files_name_the_problem(
    tmp_path: Path, name: str, content: str | None, options: dict, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        write(path, content)
    if name == "latin1.csv":
        path.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_labelled(path, **options)
    assert "\n" not in str(info.value)


def test_corpus_reader(tmp_path: Path) -> None:
    assert read_corpus(write(tmp_path / "c.txt", "héllo 🌍\n")) == "héllo 🌍\n"
    with pytest.raises(ExportError, match="is empty"):
        read_corpus(write(tmp_path / "e.txt", " \n\t\n"))
    with pytest.raises(ExportError, match="does not exist"):
        read_corpus(tmp_path / "nope.txt")
