"""Hugging Face chat templates, rendered as `tokenizer.apply_chat_template(messages, tokenize=False)` renders
them, with jinja2 alone (the server does not depend on transformers).

What transformers 5 does, and this module with it (`transformers/utils/chat_template_utils.py`):

- the environment: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `loopcontrols` extension and a `{% generation %}` tag (transformers uses it to track assistant tokens; it
  renders its body unchanged);
- its own `tojson` (plain `json.dumps`, `ensure_ascii=False`: Jinja's filter would escape ``<``, ``>``, ``&``
  and ``'``), `raise_exception`, `strftime_now`, a limited `dict` and a `namespace` that refuses
  underscore-prefixed names;
- the variables: `messages`, `tools` and `documents` (None here), `add_generation_prompt` and the tokenizer's
  named special tokens (`bos_token`, `eos_token`...);
- the messages: keys whose value is None are dropped, the data is copied to plain JSON types, and a message's
  reasoning is also passed as `reasoning_content` and `thinking`, the names templates read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidInput

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# Names a message's reasoning comes under; templates read the first, gpt-oss templates read "thinking".
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MAX_ERROR_CHARS = 200


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to.

    Raises:
        ValueError: the template does not compile (the message is one line).
    """

    __slots__ = ("_template", "source", "special_tokens")

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            where = f" (line {e.lineno})" if isinstance(e, jinja2.TemplateSyntaxError) else ""
            raise ValueError(f"chat template does not compile: {_one_line(e)}{where}") from e

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """The template of a tokenizer folder as `save_pretrained` writes it: `chat_template.jinja`, else the
        `chat_template` of `tokenizer_config.json` (a string, or named templates of which "default" is used).
        None when the folder has no template."""
        folder = Path(folder)
        config_file = folder / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        template_file = folder / TEMPLATE_FILE
        if template_file.is_file():
            source = template_file.read_text(encoding="utf-8")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):
                source = {t["name"]: t["template"] for t in source}
            if isinstance(source, Mapping):
                if "default" not in source:
                    raise ValueError(
                        f"{config_file}: named chat templates {sorted(source)}, none is 'default'"
                    )
                source = source["default"]
            if source is None:
                return None
            if not isinstance(source, str):
                raise ValueError(f"{config_file}: chat_template is neither a string nor a list of templates")
        return cls(source, _special_tokens(folder, config))

    def render(
        self,
        messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text of a conversation: (role, content) pairs or message dicts (`tool_calls`...).

        Raises:
            InvalidInput: no messages, a malformed message, or the template refused the conversation (its
                `raise_exception`, such as "roles must alternate") or failed on it.
        """
        if not messages:
            raise InvalidInput("messages", "empty: a conversation needs at least one message")
        chat = [_message(i, m) for i, m in enumerate(messages)]
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise InvalidInput("messages", _one_line(e)) from e


def _message(index: int, message: tuple[str, str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, Mapping):
        plain = {k: v for k, v in _plain(message).items() if v is not None}
    elif (
        isinstance(message, (tuple, list)) and len(message) == 2 and all(isinstance(s, str) for s in message)
    ):
        plain = {"role": str.__str__(message[0]), "content": str.__str__(message[1])}
    else:
        raise InvalidInput(f"messages[{index}]", "neither a (role, content) pair nor a mapping")
    reasoning = next((plain[k] for k in REASONING_FIELDS if plain.get(k) is not None), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types (and tuples), so that the sandbox sees no caller's object with methods
    of its own; anything else becomes an inert placeholder such as "<ndarray>", as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _special_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens, as transformers 5 reads them: the standard ones, any other `*_token` key
    and the named `extra_special_tokens` (image_token...), each a string or an AddedToken dict (its
    "content"). A legacy `special_tokens_map.json` counts only where the config has no
    `added_tokens_decoder`, and then wins."""
    found = dict(config)
    legacy = folder / LEGACY_SPECIAL_TOKENS_FILE
    if "added_tokens_decoder" not in config and legacy.is_file():
        found.update(json.loads(legacy.read_text(encoding="utf-8")))
    extra = found.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        found.update(extra)
    tokens = {}
    for name, value in found.items():
        if isinstance(value, Mapping):
            value = value.get("content")
        if name.endswith("_token") and isinstance(value, str):
            tokens[name] = value
    return tokens


def _one_line(error: Exception) -> str:
    text = " ".join(str(getattr(error, "message", None) or error).split()) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; it renders its
    body as it is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)`, without the class itself (no attribute tricks from templates)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore-prefixed names (they lead to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own trick: a keyword argument may be "self"
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a namespace cannot hold underscore-prefixed names: {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


_ENV: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    # One environment for every template: it holds no per-render state.
    global _ENV
    if _ENV is None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _Namespace
        _ENV = env
    return _ENV
