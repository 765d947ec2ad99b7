"""Incremental detokenization: never a broken character, and the pieces add up to the whole text."""

from __future__ import annotations

from server.generation.detokenize import REPLACEMENT, IncrementalDetokenizer

TEXT = "def naïve(x):\n    return 'café 日本語 😀 𝄞' + x  # ok\n"


def pieces_of(tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    return [detok.add(i) for i in ids]


def test_pieces_are_whole_characters_and_concatenate_to_the_text(generator):
    tok = generator.tokenizer
    ids = tok.encode(TEXT).ids
    pieces = pieces_of(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any(REPLACEMENT in p for p in pieces)
    # Some character did span tokens (the rare ones are byte tokens), so something was held back.
    assert "" in pieces


def test_after_a_prompt_spaces_and_text_stay_right(generator):
    tok = generator.tokenizer
    prompt = tok.encode("import json").ids
    ids = tok.encode(" and the 😀 rest").ids
    assert "".join(pieces_of(tok, ids, prompt)) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


def _byte_token(tok, byte: int) -> int | None:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to chr(256 + n).
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    n = 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return tok.token_to_id(table[byte])


def test_bytes_that_never_form_a_character_are_dropped(generator):
    tok = generator.tokenizer
    stray = _byte_token(tok, 0x80)  # a continuation byte with no lead byte
    assert stray is not None, "expected a byte-level BPE tokenizer"
    ids = [stray, *tok.encode("ok").ids]
    pieces = pieces_of(tok, ids)
    assert "".join(pieces) == "ok"
    assert not any(REPLACEMENT in p for p in pieces)


def test_a_character_held_by_an_incomplete_one_comes_out_at_the_end():
    # One token ending "é" and beginning "🎉" (byte-level: é = C3 A9, 🎉 = F0 9F 8E 89): after it the text ends
    # in half a character, so "é" is held; if generation then ends, flush must still give it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    byte = {b: ch for b, ch in zip(range(256), _bytes_to_unicode())}
    merged = byte[0xA9] + byte[0xF0]
    vocab[merged] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(byte[0xA9], byte[0xF0])]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    detok = IncrementalDetokenizer(tok)
    assert detok.add(vocab[byte[ord("a")]]) == "a"
    assert detok.add(vocab[byte[0xC3]]) == ""
    assert detok.add(vocab[merged]) == ""  # "é" and the first byte of 🎉: held
    assert detok.flush() == "é"
    assert detok.flush() == ""


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]
