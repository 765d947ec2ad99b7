"""The chat request the client builds: (role, content) pairs or OpenAI-style mappings, and clear errors for
anything else (naming the message), before anything is sent."""

from __future__ import annotations

import pytest

from client._requests import chat_request


def test_pairs_and_mappings_make_the_same_request() -> None:
    pairs = chat_request([("system", "Be brief."), ("user", "Hi")], "m", max_new_tokens=8)
    dicts = chat_request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "m",
                         max_new_tokens=8)
    assert pairs == dicts
    assert [(m.role, m.content) for m in pairs.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert pairs.prompt == "" and pairs.model == "m" and pairs.parameters.max_new_tokens == 8


@pytest.mark.parametrize(
    "messages, where",
    [
        (["hi"], "messages[0]"),
        (("user", "hello"), "not one message"),
        ([{"role": "user"}], "messages[0]"),
        ([("user", "a", "b")], "messages[0]"),
        ([("user", 3)], "messages[0]"),
    ],
)
def test_malformed_messages_name_the_message(messages, where: str) -> None:
    with pytest.raises(TypeError) as info:
        chat_request(messages, None)
    assert where in str(info.value)
