"""Stop sequences across token boundaries; their text is never emitted; other text is only delayed."""

from __future__ import annotations

from server.generation.stopping import StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_spanning_pieces_is_found_and_not_emitted():
    assert feed(StopMatcher(["\n\n"]), ["Hello", " world\n", "\nmore"]) == ("Hello world", True)
    assert feed(StopMatcher(["END"]), ["abc E", "N", "D tail"]) == ("abc ", True)


def test_text_that_only_looked_like_a_stop_is_released():
    m = StopMatcher(["END"])
    assert m.push("abc EN") == ("abc ", False)  # "EN" held back
    assert m.push("ter") == ("ENter", False)
    assert feed(StopMatcher(["END"]), ["EN"]) == ("EN", False)  # flushed at the end


def test_earliest_of_several_stops_wins():
    assert feed(StopMatcher(["world", "lo w"]), ["hello world"]) == ("hel", True)


def test_no_stops_passes_text_through():
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)


def test_stop_inside_one_piece_and_multi_character_unicode():
    assert feed(StopMatcher(["😀"]), ["naïve ", "café😀 after"]) == ("naïve café", True)
