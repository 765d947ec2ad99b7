"""The nlpserve command line: `nlpserve ...` or `python -m client ...`.

    nlpserve [--target HOST:PORT] [--timeout S] [--json] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]
             [--api-key KEY] models [NAME]
    nlpserve health [SERVICE]
    nlpserve classify [--model NAME] [--embedding] [--no-truncation] TEXT...
    nlpserve embed [--model NAME] [--dimensions N] [--no-truncation] TEXT...
    nlpserve entities [--model NAME] [--aggregation none|simple|first|average|max] [--no-truncation] TEXT...
    nlpserve generate [--model NAME] PROMPT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                      [--repetition-penalty R] [--seed S] [--stop STR ...] [--logprobs] [--no-stream] [--stats]
    nlpserve chat [--model NAME] [--system TEXT] (MESSAGE | --interactive) [the options of generate]

Exit codes: 0 success; 1 the call failed (the error's status code and message on one line of stderr) or, for
`health`, the status is not SERVING; 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import grpc

from ._requests import AGGREGATIONS, DEFAULT_TARGET
from .errors import ServerError
from .sync import API_KEY_ENV, Client, auth_metadata, read_pem
from .types import (
    ClassifyResult,
    EmbedResult,
    Generation,
    GenerationChunk,
    ModelInfo,
    ModelKind,
    TokenClassifyResult,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The CA file can come from the environment (a container's health check, say); the client certificate and key
# cannot: NLPSERVE_TLS_CERT and NLPSERVE_TLS_KEY are the server's own settings.
TLS_CA_ENV = "NLPSERVE_TLS_CA"
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


class UsageError(Exception):
    """Bad command-line usage: printed as one line, exit code 2."""


class CommandFailed(Exception):
    """The command cannot be done on this server (no call failed): printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage and exits on a bad flag; we want one line and no SystemExit mid-parse.
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------------------
# Arguments


def _int_in(low: int, high: int, what: str = "an integer") -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in [{low}, {high}], got {value}")
        return value

    return parse


def _float(text: str) -> float:
    # Not argparse's `float`: its error says "invalid float value"; and NaN or inf are passed on for the
    # server to judge (it names the field).
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _timeout(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the CLI."""
    # The connection and output options are accepted before and after the command (`nlpserve --json models`
    # and `nlpserve models --json`); SUPPRESS keeps a subcommand's absent flag from hiding the global one.
    common = _Parser(add_help=False)
    common.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help=f"the server, HOST:PORT (default: $NLPSERVE_TARGET, else {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=_timeout,
        metavar="S",
        default=argparse.SUPPRESS,
        help="deadline of each call, in seconds",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output: one JSON object (one per line for a stream)",
    )
    common.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TLS, trusting the CA certificate(s) in FILE, PEM (default: ${TLS_CA_ENV})",
    )
    common.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="mTLS: the client certificate (PEM), with --tls-key",
    )
    common.add_argument(
        "--tls-key",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="mTLS: the client certificate's key (PEM)",
    )
    common.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS,
        help="TLS, trusting the system's root certificates",
    )
    common.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="the name the server's certificate must hold, when not the target's host",
    )
    common.add_argument(
        "--api-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help=f"sent as `authorization: Bearer KEY` (default: ${API_KEY_ENV}, which, unlike a flag, `ps` does "
        "not show)",
    )

    parser = _Parser(
        prog=prog or _prog(),
        description="Talk to an nlpserve server: list models, check health, classify, embed and read texts "
        "(entities), generate text and chat.",
        parents=[common],
        epilog="Exit codes: 0 success; 1 the call failed (or health is not SERVING); 2 bad usage.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser(
        "models", parents=[common], help="list the models (or describe one)", description="List the models."
    )
    models.add_argument("name", nargs="?", help="describe only this model")

    health = commands.add_parser(
        "health",
        parents=[common],
        help="the server's health status; exit code 0 only when SERVING",
        description="Print the gRPC health status; exit code 0 only when SERVING.",
    )
    health.add_argument("service", nargs="?", default="", help="a model's name (default: the whole server)")

    classify = commands.add_parser(
        "classify",
        parents=[common],
        help="classify texts",
        description="Classify texts, one result per text.",
    )
    classify.add_argument(
        "texts", nargs="+", metavar="TEXT", help="texts to classify; '-' reads one per line of stdin"
    )
    classify.add_argument(
        "--model", metavar="NAME", help="the classifier (default: the server's only classifier)"
    )
    classify.add_argument(
        "--embedding", action="store_true", help="also return the pooled sentence vectors (shown with --json)"
    )
    classify.add_argument(
        "--no-truncation", action="store_true", help="fail on a text longer than the model's limit"
    )

    embed = commands.add_parser(
        "embed",
        parents=[common],
        help="embed texts (sentence vectors)",
        description="Embed texts with a sentence-embedding model: each vector's size and first values, then "
        "the cosine similarity of every pair of texts (the whole vectors with --json).",
    )
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed; '-' reads one per line of stdin")
    embed.add_argument("--model", metavar="NAME", help="the embedder (default: the server's only embedder)")
    embed.add_argument(
        "--dimensions",
        type=_int_in(0, INT32_MAX, "a number of dimensions"),
        metavar="N",
        help="keep only the first N values of each vector (normalized again when the model normalizes)",
    )
    embed.add_argument("--no-truncation", action="store_true", help="fail on a text longer than the model's limit")

    entities = commands.add_parser(
        "entities",
        aliases=["ner"],
        parents=[common],
        help="find the entities of texts (token classification)",
        description="Find named entities (or label every token) with a token-classification model.",
    )
    entities.add_argument(
        "texts", nargs="+", metavar="TEXT", help="texts to read; '-' reads one per line of stdin"
    )
    entities.add_argument(
        "--model", metavar="NAME", help="the token classifier (default: the server's only one)"
    )
    entities.add_argument(
        "--aggregation",
        choices=list(AGGREGATIONS),
        default="simple",
        help="how token labels become entities, as in transformers' pipeline (default: simple)",
    )
    entities.add_argument(
        "--no-truncation", action="store_true", help="fail on a text longer than the model's limit"
    )

    # What generate and chat share: the model, the sampling settings, how to print.
    sampling = argparse.ArgumentParser(add_help=False, parents=[common])
    sampling.add_argument(
        "--model", metavar="NAME", help="the generator (default: the server's only generator)"
    )
    sampling.add_argument(
        "--max-new-tokens",
        type=_int_in(-INT32_MAX - 1, INT32_MAX),
        metavar="N",
        help="tokens to generate at most",
    )
    sampling.add_argument(
        "--temperature", type=_float, default=0.0, metavar="T", help="0 (default) decodes greedily"
    )
    sampling.add_argument(
        "--top-k",
        type=_int_in(-INT32_MAX - 1, INT32_MAX),
        default=0,
        metavar="K",
        help="sample among the k best (0: all)",
    )
    sampling.add_argument("--top-p", type=_float, metavar="P", help="nucleus sampling, in (0, 1]")
    sampling.add_argument(
        "--repetition-penalty", type=_float, metavar="R", help="above 1 discourages repeats"
    )
    sampling.add_argument(
        "--seed",
        type=_int_in(0, UINT64_MAX, "a non-negative integer"),
        metavar="S",
        help="the sampler's seed: the same seed and parameters give the same text",
    )
    sampling.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="a stop sequence (repeat for several)"
    )
    sampling.add_argument(
        "--logprobs", action="store_true", help="return token log-probabilities (with --json)"
    )
    sampling.add_argument(
        "--no-stream", action="store_true", help="one unary call; print the text at the end"
    )
    sampling.add_argument(
        "--stats", action="store_true", help="print finish reason, token counts and timings to stderr"
    )

    generate = commands.add_parser(
        "generate",
        parents=[sampling],
        help="generate text from a prompt (streamed)",
        description="Generate a continuation of PROMPT, printed as it is decoded.",
    )
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")

    chat = commands.add_parser(
        "chat",
        parents=[sampling],
        help="ask a chat model (its own chat template; streamed)",
        description="Answer MESSAGE with the model's chat template, printed as it is decoded. With "
        "--interactive, each line of stdin is the next user message and the conversation is kept.",
    )
    chat.add_argument("message", metavar="MESSAGE", nargs="?", help="the user's message; '-' reads stdin")
    chat.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    chat.add_argument(
        "-i", "--interactive", action="store_true", help="a conversation: one user message per line of stdin"
    )
    return parser


def _prog() -> str:
    return "python -m client" if os.path.basename(sys.argv[0]) == "__main__.py" else "nlpserve"


# ---------------------------------------------------------------------------------------------------------
# Output


def to_json(value: Any) -> str:
    """One line of JSON."""
    return json.dumps(value, separators=(",", ":"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def format_models(models: Sequence[ModelInfo]) -> str:
    """A table of models, one per line after a header."""
    rows = [["NAME", "KIND", "VERSION", "READY", "PROVIDER", "VARIANT", "DETAILS"]]
    for m in models:
        rows.append(
            [
                m.name,
                m.kind.value,
                m.version,
                "yes" if m.ready else "no",
                m.execution_provider or "-",
                m.variant or "-",
                _model_details(m),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows
    )


def _model_details(m: ModelInfo) -> str:
    b, lim = m.batching, m.limits
    if m.kind == ModelKind.CLASSIFIER:
        parts = [
            f"labels {','.join(m.labels)}",
            f"{lim.max_sequence_length} tokens/text",
            f"{lim.max_texts_per_request} texts/request",
            f"batch {b.max_batch_size} ({b.policy}, {b.max_queue_delay_ms:g} ms)",
        ]
    elif m.kind == ModelKind.EMBEDDER:
        parts = [
            f"{m.embedding_size} dimensions ({m.pooling}{', normalized' if m.normalized else ''})",
            f"{lim.max_sequence_length} tokens/text",
            f"{lim.max_texts_per_request} texts/request",
            f"batch {b.max_batch_size} ({b.policy}, {b.max_queue_delay_ms:g} ms)",
        ]
    elif m.kind == ModelKind.TOKEN_CLASSIFIER:
        parts = [
            f"labels {','.join(m.labels)}",
            f"{lim.max_sequence_length} tokens/text",
            f"batch {b.max_batch_size} ({b.policy}, {b.max_queue_delay_ms:g} ms)",
        ]
    elif m.kind == ModelKind.GENERATOR:
        parts = [
            f"context {lim.max_sequence_length}",
            f"max_new_tokens {lim.max_new_tokens} (default {lim.default_max_new_tokens})",
            f"{b.max_active_sequences} sequences ({b.policy})",
            f"KV cache {lim.kv_cache_tokens} tokens",
        ]
        if m.chat:
            parts.append("chat")
    else:
        parts = []
    return "; ".join(parts)


def format_classifications(texts: Sequence[str], result: ClassifyResult) -> str:
    """One line per text: label, score, the text (and a mark when it was truncated)."""
    width = max((len(c.label) for c in result), default=0)
    lines = []
    for text, c in zip(texts, result):
        mark = "  [truncated]" if c.truncated else ""
        lines.append(f"{c.label.ljust(width)}  {c.score:.4f}  {_one_line(text)}{mark}")
    return "\n".join(lines)


def classify_json(texts: Sequence[str], result: ClassifyResult) -> dict[str, Any]:
    """The classify result as a dict, each classification with its text."""
    out = result.to_dict()
    for text, item in zip(texts, out["results"]):
        item["text"] = text
    return out


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors (0 when one of them is all zeros)."""
    dot = sum(x * y for x, y in zip(a, b))
    norms = (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
    return dot / norms if norms else 0.0


def format_embeddings(texts: Sequence[str], result: EmbedResult, shown: int = 4) -> str:
    """One line per text (the vector's size, norm and first values), then the cosine of every pair."""
    lines = []
    for text, e in zip(texts, result):
        norm = sum(v * v for v in e.values) ** 0.5
        head = ", ".join(f"{v:+.4f}" for v in e.values[:shown])
        more = ", ..." if len(e.values) > shown else ""
        mark = "  [truncated]" if e.truncated else ""
        lines.append(f"[{head}{more}]  ({len(e.values)} values, norm {norm:.4f})  {_one_line(text)}{mark}")
    if len(texts) > 1:
        lines.append("cosine similarity:")
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                sim = cosine(result[i].values, result[j].values)
                lines.append(f"  {sim:+.4f}  {i + 1} {_one_line(texts[i])}  ~  {j + 1} {_one_line(texts[j])}")
    return "\n".join(lines)


def format_entities(texts: Sequence[str], result: TokenClassifyResult) -> str:
    """Each text, then one indented line per entity: label, score, character span, text."""
    lines = []
    for text, r in zip(texts, result):
        lines.append(_one_line(text) + ("  [truncated]" if r.truncated else ""))
        if not r.entities:
            lines.append("  (no entity)")
        width = max((len(e.label) for e in r), default=0)
        for e in r:
            lines.append(f"  {e.label.ljust(width)}  {e.score:.4f}  [{e.start}:{e.end}]  {_one_line(e.text)}")
    return "\n".join(lines)


def format_stats(last: Generation | GenerationChunk) -> str:
    """One line: finish reason, token counts and timings of a finished generation."""
    parts = [f"finish_reason={last.finish_reason.value if last.finish_reason else '?'}"]
    if last.usage is not None:
        parts += [
            f"prompt_tokens={last.usage.prompt_tokens}",
            f"generated_tokens={last.usage.generated_tokens}",
        ]
    if last.timings is not None:
        t = last.timings
        parts += [
            f"queue={t.queue_seconds:.4f}s",
            f"time_to_first_token={t.time_to_first_token_seconds:.4f}s",
            f"total={t.total_seconds:.4f}s",
        ]
    return " ".join(parts)


def format_error(error: ServerError, target: str) -> str:
    """The one line printed for a failed call: `error: CODE: message`."""
    details = error.details
    if error.code == grpc.StatusCode.UNAVAILABLE and "handshake failed" in details.lower():
        # A certificate the client does not trust (wrong CA, expired, another name), or TLS to a plaintext port.
        details = f"TLS handshake with the server at {target} failed ({details})"
    elif error.code == grpc.StatusCode.UNAVAILABLE and _is_transport_failure(details):
        details = f"cannot reach the server at {target} ({details})"
    return f"error: {error.code.name}: {details}" if details else f"error: {error.code.name}"


def _is_transport_failure(details: str) -> bool:
    lowered = details.lower()
    return any(
        s in lowered
        for s in (
            "failed to connect",
            "connection refused",
            "dns resolution failed",
            "errors resolving",
            "socket closed",
        )
    )


# ---------------------------------------------------------------------------------------------------------
# Commands


def default_model(client: Client, kind: ModelKind, chat: bool = False) -> str:
    """The server's only model of this kind (`chat`: the only generator with a chat template).

    Raises:
        CommandFailed: The server hosts none.
        UsageError: The server hosts several (then `--model` must choose).
    """
    names = sorted(m.name for m in client.list_models() if m.kind == kind and (m.chat or not chat))
    what = "chat model" if chat else kind.value.replace("_", " ")
    if len(names) == 1:
        return names[0]
    if not names:
        raise CommandFailed(f"the server at {client.target} hosts no {what}")
    raise UsageError(f"the server hosts several {what}s ({', '.join(names)}): choose one with --model")


def _read_lines(stdin: TextIO) -> list[str]:
    return [line.rstrip("\r\n") for line in stdin if line.strip()]


def run_models(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.name is not None:
        model = client.get_model(args.name)
        print(to_json(model.to_dict()) if args.json else format_models([model]), file=out)
        return EXIT_OK
    models = client.list_models()
    if args.json:
        print(to_json({"models": [m.to_dict() for m in models]}), file=out)
    else:
        print(format_models(models), file=out)
    return EXIT_OK


def run_health(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    try:
        status = client.health(args.service)
    except ServerError as e:
        if e.code == grpc.StatusCode.NOT_FOUND and not e.details:
            # The standard health service answers a service it does not know with a bare NOT_FOUND.
            raise ServerError(e.code, f"the server has no health service {args.service!r}") from e
        raise
    print(to_json({"service": args.service, "status": status}) if args.json else status, file=out)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def run_classify(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    texts = _read_lines(stdin) if args.texts == ["-"] else args.texts
    model = args.model or default_model(client, ModelKind.CLASSIFIER)
    result = client.classify(
        texts, model=model, return_embedding=args.embedding, no_truncation=args.no_truncation
    )
    if args.json:
        print(to_json(classify_json(texts, result)), file=out)
    else:
        print(format_classifications(texts, result), file=out)
    return EXIT_OK


def run_embed(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    texts = _read_lines(stdin) if args.texts == ["-"] else args.texts
    model = args.model or default_model(client, ModelKind.EMBEDDER)
    result = client.embed(texts, model=model, dimensions=args.dimensions, no_truncation=args.no_truncation)
    if args.json:
        out_dict = result.to_dict()
        for text, item in zip(texts, out_dict["embeddings"]):
            item["text"] = text
        print(to_json(out_dict), file=out)
    else:
        print(format_embeddings(texts, result), file=out)
    return EXIT_OK


def run_entities(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    texts = _read_lines(stdin) if args.texts == ["-"] else args.texts
    model = args.model or default_model(client, ModelKind.TOKEN_CLASSIFIER)
    result = client.classify_tokens(
        texts, model=model, aggregation=args.aggregation, no_truncation=args.no_truncation
    )
    if args.json:
        out_dict = result.to_dict()
        for text, item in zip(texts, out_dict["results"]):
            item["text"] = text
        print(to_json(out_dict), file=out)
    else:
        print(format_entities(texts, result), file=out)
    return EXIT_OK


def _sampling(client: Client, args: argparse.Namespace, chat: bool = False) -> dict[str, Any]:
    return {
        "model": args.model or default_model(client, ModelKind.GENERATOR, chat),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "logprobs": args.logprobs,
    }


def run_generate(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    prompt = stdin.read() if args.prompt == "-" else args.prompt
    kwargs = _sampling(client, args)
    if args.no_stream:
        _print_whole(client.generate(prompt, **kwargs), args, out, err)
    else:
        _print_stats(_print_stream(client.generate_stream(prompt, **kwargs), args.json, out), args, err)
    return EXIT_OK


def run_chat(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    if args.interactive == (args.message is not None):
        raise UsageError("give a MESSAGE, or --interactive to read the conversation from stdin")
    kwargs = _sampling(client, args, chat=True)
    messages: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    turns = (line.rstrip("\r\n") for line in stdin) if args.interactive else iter(
        [stdin.read() if args.message == "-" else args.message]
    )
    code = EXIT_OK
    for turn in turns:
        if args.interactive and not turn.strip():
            continue
        messages.append(("user", turn))
        try:
            if args.no_stream:
                answer = client.chat(messages, **kwargs)
                _print_whole(answer, args, out, err)
                text = answer.text
            else:
                pieces: list[str] = []
                stream = _keeping_text(client.chat_stream(messages, **kwargs), pieces)
                _print_stats(_print_stream(stream, args.json, out), args, err)
                text = "".join(pieces)
        except ServerError as e:
            if not args.interactive:
                raise
            # One failed turn (the conversation outgrew the context, a deadline...) does not end the session:
            # it is said on stderr and left out of the conversation.
            print(format_error(e, client.target), file=err)
            messages.pop()
            code = EXIT_FAILED
            continue
        messages.append(("assistant", text))  # the next turn sees the whole conversation
    return code


def _keeping_text(chunks: Iterable[GenerationChunk], pieces: list[str]) -> Iterator[GenerationChunk]:
    """The chunks, passed on as they come; their texts are appended to `pieces` (the answer, for the next turn)."""
    for chunk in chunks:
        pieces.append(chunk.text)
        yield chunk


def _print_whole(generation: Generation, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    out.write(to_json(generation.to_dict()) + "\n" if args.json else _text_line(generation.text))
    out.flush()
    _print_stats(generation, args, err)


def _print_stats(last: Generation | GenerationChunk | None, args: argparse.Namespace, err: TextIO) -> None:
    if args.stats and last is not None:
        print(format_stats(last), file=err)


def _print_stream(chunks: Iterable[GenerationChunk], as_json: bool, out: TextIO) -> GenerationChunk | None:
    """Prints each chunk as it arrives (flushed): its text, or one JSON object per line. Returns the last."""
    last = None
    printed = ended_line = finished = False
    try:
        for chunk in chunks:
            last = chunk
            if as_json:
                out.write(to_json(chunk.to_dict()) + "\n")
            elif chunk.text:
                out.write(chunk.text)
                printed, ended_line = True, chunk.text.endswith("\n")
            out.flush()
        finished = True
    finally:
        # The text ends its line (as with --no-stream), also when the stream fails midway, before the error
        # is printed; a failed stream that printed nothing leaves stdout empty.
        if not as_json and not ended_line and (printed or finished):
            out.write("\n")
            out.flush()
    return last


def _text_line(text: str) -> str:
    """Generated text as printed: ending with one newline (its own, or an added one)."""
    return text if text.endswith("\n") else text + "\n"


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """The Client's TLS and API key arguments, the files read here so that an error names the flag."""
    connection: dict[str, Any] = {
        "tls": getattr(args, "tls", False),
        "tls_server_name": getattr(args, "tls_server_name", None),
    }
    paths = {
        "tls_ca": getattr(args, "tls_ca", None),
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
    }
    flags = {name: "--" + name.replace("_", "-") for name in paths}
    if paths["tls_ca"] is None and os.environ.get(TLS_CA_ENV):
        paths["tls_ca"], flags["tls_ca"] = os.environ[TLS_CA_ENV], f"${TLS_CA_ENV}"
    if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
        raise UsageError("--tls-cert and --tls-key go together")
    for name, path in paths.items():
        if path is None:
            continue
        flag = flags[name]
        try:
            connection[name] = read_pem(path, flag)
        except OSError as e:
            raise UsageError(f"{flag} {path}: {e.strerror or e}") from e
        except ValueError as e:
            raise UsageError(f"{flag} {path}: no PEM data in it") from e
    api_key = getattr(args, "api_key", None)
    try:
        auth_metadata(api_key)
    except ValueError:
        raise UsageError(f"--api-key (or ${API_KEY_ENV}): must be printable ASCII without spaces") from None
    connection["api_key"] = api_key
    return connection


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Runs the CLI; returns the exit code. Never raises for a failed call or bad usage."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    if isinstance(out, io.TextIOWrapper):
        # Generated text on a terminal that cannot show a character: a replacement mark, not a traceback.
        out.reconfigure(errors="replace")
    try:
        with contextlib.redirect_stdout(out):  # where --help goes
            args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    args.json = getattr(args, "json", False)
    target = getattr(args, "target", None) or os.environ.get("NLPSERVE_TARGET") or DEFAULT_TARGET
    timeout = getattr(args, "timeout", None)
    try:
        connection = _connection(args)
    except UsageError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    try:
        with Client(target, timeout=timeout, **connection) as client:
            if args.command == "models":
                return run_models(client, args, out)
            if args.command == "health":
                return run_health(client, args, out)
            if args.command == "classify":
                return run_classify(client, args, out, inp)
            if args.command == "embed":
                return run_embed(client, args, out, inp)
            if args.command in ("entities", "ner"):
                return run_entities(client, args, out, inp)
            if args.command == "chat":
                return run_chat(client, args, out, err, inp)
            return run_generate(client, args, out, err, inp)
    except ServerError as e:
        print(format_error(e, target), file=err)
        return EXIT_FAILED
    except UsageError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    except CommandFailed as e:
        print(f"error: {e}", file=err)
        return EXIT_FAILED
    except (ValueError, TypeError) as e:
        # The flags' types rule out requests the proto cannot carry, so this is an answer the client cannot
        # read (the library says which).
        print(f"error: {_one_line(str(e))}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted", file=err)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; point stdout at devnull so that the interpreter's
        # final flush does not fail again.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
