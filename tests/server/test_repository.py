"""config.json is checked at start-up like the flags: one line naming the file and the field, for each of the
values seen to crash or wedge the server (a JSON list, a negative context, a negative queue size, zero active
sequences...), and the demo's own files pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.errors import StartupError
from server.repository import ModelConfig, scan


def test_the_quick_demo_and_the_llm_repository_pass(quick_repo: Path, llm_repo: Path) -> None:
    assert [c.name for c in scan(quick_repo)] == ["docgpt", "minilm-embed", "sentiment"]
    # Every demo model has its GPU file (docker-compose.yml serves fp16 on the GPU) and its CPU one.
    for config in scan(quick_repo):
        assert {"fp32", "fp16", "int8"} <= config.variants.keys(), config.name
        assert all((config.path / file).is_file() for file in config.variants.values()), config.name
    assert {c.name: c.kv_cache for c in scan(llm_repo)} == {"tinyllama": "shared_buffer", "tinyqwen": "shared_buffer"}


def test_the_demo_llm_is_built_with_its_gpu_file() -> None:
    # The full demo's smollm2 (too slow to build in the suite): fp32 served by default, int4 for CPUs, fp16 for
    # GPUs (built for CUDA by the onnxruntime-genai builder, verified on the CPU provider).
    from export.demo import llm_options

    options = llm_options(Path("SmolLM2.gguf"), None)
    assert set(options.variants) == {"int4", "fp16"} and options.default_variant == "fp32"


def with_config(quick_repo: Path, tmp_path: Path, model: str, change) -> Path:
    folder = tmp_path / model / "1"
    shutil.copytree(quick_repo / model / "1", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    return folder


def setting(section: str | None, key: str, value):
    def change(config: dict) -> dict:
        (config[section] if section else config)[key] = value
        return config

    return change


@pytest.mark.parametrize(
    "model, change, message",
    [
        ("docgpt", lambda c: [c], "not a JSON object"),
        ("docgpt", setting(None, "max_sequence_length", -1), "max_sequence_length is -1, must be an integer of at least 1"),
        ("docgpt", setting("batching", "max_queue_size", -5), "batching.max_queue_size is -5"),
        ("docgpt", setting("batching", "max_active_sequences", 0), "batching.max_active_sequences is 0"),
        ("docgpt", setting("batching", "kv_cache_tokens", 1.5), "batching.kv_cache_tokens is 1.5"),
        ("docgpt", setting("generation", "max_new_tokens", "many"), 'generation.max_new_tokens is "many"'),
        ("docgpt", setting("generation", "eos_token_ids", [1, -2]), "generation.eos_token_ids is [1, -2]"),
        ("docgpt", setting("special_tokens", "eos", 1.5), "special_tokens.eos is 1.5, must be a token id or null"),
        ("docgpt", setting(None, "batching", []), "batching is [], must be an object"),
        ("sentiment", setting("batching", "max_queue_delay_ms", -1.0), "batching.max_queue_delay_ms is -1.0"),
        ("sentiment", setting("batching", "max_batch_size", True), "batching.max_batch_size is true"),
        ("sentiment", setting(None, "pooling", "sum"), 'pooling is "sum"'),
        ("sentiment", setting(None, "labels", "positive"), 'labels is "positive", must be a list of strings'),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(quick_repo: Path, tmp_path: Path, model: str, change,
                                                   message: str) -> None:
    folder = with_config(quick_repo, tmp_path, model, change)
    with pytest.raises(StartupError) as info:
        ModelConfig.read(folder)
    text = str(info.value)
    assert "\n" not in text and str(folder / "config.json") in text and message in text
