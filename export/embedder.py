"""The sentence embedder: an encoder without a head whose pooling and L2 normalization (a sentence-transformers
model's Pooling and Normalize modules) are part of the graph, so that the server's one output is the
sentence vector itself and no client re-implements the pooling.

A sentence-transformers folder says how it embeds in its own files (modules.json, the Pooling module's
config.json, sentence_bert_config.json); `read_folder` turns them into settings and refuses what one graph
cannot hold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, normalizers
from torch import nn

from export import classifier as clf
from export.classifier import Pooling
from export.errors import ExportError, check_checkpoint_folder
from export.verify import cosine_rows

logger = logging.getLogger(__name__)

# sentence-transformers writes these pooling modes; only the ones the graph implements are accepted.
POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# A tokenizer's model_max_length above this is transformers' "no limit" placeholder (1e30), not a length.
NO_LIMIT = 1_000_000

# The quality check: paraphrases should score above unrelated pairs. A handful of everyday sentences, so
# that the figure says "this model embeds meaning" at a glance; it is recorded, never enforced (a random
# model fails it).
PARAPHRASES = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The train to Paris was delayed by an hour.", "Our train to Paris left an hour late."),
    ("She bought a new car yesterday.", "Yesterday she purchased a new automobile."),
    ("The restaurant serves excellent Italian food.", "That restaurant has great Italian cuisine."),
    ("It is going to rain tomorrow.", "Tomorrow's forecast says it will rain."),
]
UNRELATED = [
    ("The cat is sleeping on the sofa.", "The stock market fell sharply this morning."),
    ("How do I reset my password?", "Bananas are a good source of potassium."),
    ("The train to Paris was delayed by an hour.", "He plays the violin in a string quartet."),
    ("She bought a new car yesterday.", "Photosynthesis turns light into chemical energy."),
    ("The restaurant serves excellent Italian food.", "The server restarts every night at midnight."),
    ("It is going to rain tomorrow.", "My grandmother knits warm scarves for the winter."),
]
# The parity batch: texts of clearly different lengths, so that most rows are padded.
PARITY_TEXTS = [
    "Hi.",
    "The cat is sleeping on the sofa.",
    "How do I reset my password if I no longer have access to the email address on my account?",
    "Café, naïve, Zürich: accents and punctuation (and numbers like 3.14) are tokenized too.",
    (
        "A much longer text, of the kind people embed for search: it describes a product in some detail, "
        "mentions its price, the colours it comes in, how long delivery takes, what the warranty covers, and "
        "ends with a question about whether it can be returned after thirty days if it does not fit."
    ),
    "Two words",
]


@dataclass(frozen=True)
class FolderSettings:
    """What a checkpoint folder says about its sentence embedding."""

    checkpoint: Path  # the Hugging Face encoder folder (a sentence-transformers folder's Transformer module)
    pooling: Pooling
    normalize: bool
    max_length: int | None  # None: the folder does not say
    sentence_transformers: bool
    lowercase: bool = False  # sentence-transformers' do_lower_case: lower-case before tokenizing


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def _module_kind(entry: Any, modules_file: Path) -> tuple[str, str]:
    """(class name, path) of one modules.json entry. The class name is what matters: sentence-transformers 6
    moved the classes (`sentence_transformers.base.modules.transformer.Transformer`) that older folders name
    `sentence_transformers.models.Transformer`."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise ExportError(f"{modules_file}: an entry without a module type")
    return entry["type"].rsplit(".", 1)[-1], str(entry.get("path", ""))


def _pooling_mode(config_file: Path) -> Pooling:
    """The Pooling module's mode: `pooling_mode` (sentence-transformers 6) or the older boolean keys."""
    config = _read_json(config_file)
    mode = config.get("pooling_mode") if isinstance(config, dict) else None
    if mode is None and isinstance(config, dict):
        mode = [name for key, name in POOLING_KEYS.items() if config.get(key)]
    modes = [mode] if isinstance(mode, str) else list(mode or [])
    if len(modes) != 1:
        shown = " + ".join(map(str, modes)) or "none"
        raise ExportError(f"{config_file}: pooling modes {shown}: exactly one of cls, mean or max is supported")
    if modes[0] not in {p.value for p in Pooling}:
        raise ExportError(f"{config_file}: pooling mode {modes[0]} is not supported (cls, mean or max)")
    return Pooling(modes[0])


def _sentence_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "sentence_bert_config.json"
    config = _read_json(path) if path.is_file() else {}
    return config if isinstance(config, dict) else {}


def _max_length(checkpoint: Path, sentence_config: dict[str, Any]) -> int | None:
    """sentence_bert_config.json's max_seq_length (older folders), else the tokenizer's model_max_length
    (sentence-transformers 6 keeps it there)."""
    length = sentence_config.get("max_seq_length")
    if length is None and (checkpoint / "tokenizer_config.json").is_file():
        length = _read_json(checkpoint / "tokenizer_config.json").get("model_max_length")
    if isinstance(length, int) and 0 < length < NO_LIMIT:
        return length
    return None


def read_folder(folder: Path) -> FolderSettings:
    """The settings of a sentence-transformers folder (one with modules.json) or of a plain Hugging Face
    encoder checkpoint (mean pooling, no normalization, as sentence-transformers itself would wrap one)."""
    if not folder.is_dir():
        raise ExportError(f"checkpoint folder {folder} does not exist")
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        check_checkpoint_folder(folder)
        return FolderSettings(folder, Pooling.MEAN, False, _max_length(folder, {}), sentence_transformers=False)
    entries = _read_json(modules_file)
    if not isinstance(entries, list) or not entries:
        raise ExportError(f"{modules_file}: not a list of modules")
    kinds = [_module_kind(entry, modules_file) for entry in entries]
    names = [name for name, _ in kinds]
    # The graph holds exactly this pipeline; a Dense projection (and the rest) would change the vector.
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        unsupported = [n for n in names if n not in ("Transformer", "Pooling", "Normalize")]
        detail = f"module {unsupported[0]} cannot be exported" if unsupported else f"modules {' -> '.join(names)}"
        raise ExportError(f"{folder}: {detail} (supported: Transformer -> Pooling [-> Normalize])")
    checkpoint = folder / kinds[0][1]
    check_checkpoint_folder(checkpoint)
    sentence_config = _sentence_config(checkpoint)
    return FolderSettings(
        checkpoint=checkpoint,
        pooling=_pooling_mode(folder / kinds[1][1] / "config.json"),
        normalize=len(names) == 3,
        max_length=_max_length(checkpoint, sentence_config),
        sentence_transformers=True,
        lowercase=bool(sentence_config.get("do_lower_case")),
    )


class SentenceEmbedder(nn.Module):
    """encoder -> pooling over real tokens -> optional L2 normalization. forward returns (B, C)."""

    def __init__(self, encoder: nn.Module, pooling: Pooling, normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (B, T, C)
        embedding = clf.pool(hidden, attention_mask, self.pooling)  # (B, C)
        if self.normalize:
            # sentence-transformers' Normalize (F.normalize): x / max(|x|, 1e-12), written with a sum of squares
            # and a broadcast: onnxruntime's shape inference follows neither F.normalize's Expand nor ReduceL2,
            # and without shapes the `opt` variant loses its SkipLayerNormalization fusions.
            norm = (embedding * embedding).sum(dim=1, keepdim=True).sqrt()  # (B, 1)
            embedding = embedding / norm.clamp(min=1e-12)
        return embedding


@dataclass
class LoadedEmbedder:
    model: SentenceEmbedder
    tokenizer: Tokenizer  # without padding or truncation
    config: object  # the encoder's transformers config
    uses_token_types: bool
    source: str


def _lowercasing(tokenizer: Tokenizer) -> bool:
    def lowers(spec: Any) -> bool:
        if not isinstance(spec, dict):
            return False
        if spec.get("type") == "Lowercase" or (spec.get("type") == "BertNormalizer" and spec.get("lowercase")):
            return True
        return any(lowers(inner) for inner in spec.get("normalizers") or [])

    return lowers(json.loads(tokenizer.to_str()).get("normalizer"))


def _lowercased(tokenizer: Tokenizer) -> Tokenizer:
    """do_lower_case as sentence-transformers applies it: a Lowercase normalizer first, unless the tokenizer
    already lower-cases. Written into tokenizer.json, so that the server needs no flag for it."""
    if _lowercasing(tokenizer):
        return tokenizer
    existing = tokenizer.normalizer
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([existing] if existing else [])])
    return tokenizer


def load(settings: FolderSettings, pooling: Pooling, normalize: bool) -> LoadedEmbedder:
    """The encoder of a checkpoint folder (its Transformer module's), with the given pooling."""
    base = clf.load_base(settings.checkpoint, 1, pooling)  # the classifier's loader; its head is dropped
    tokenizer = _lowercased(base.tokenizer) if settings.lowercase else base.tokenizer
    encoder = base.model.encoder
    return LoadedEmbedder(SentenceEmbedder(encoder, pooling, normalize), tokenizer, base.config, base.uses_token_types,
                          str(settings.checkpoint))


def scratch(
    tokenizer: Tokenizer, pooling: Pooling, normalize: bool, *, layers: int, heads: int, hidden: int, max_length: int
) -> LoadedEmbedder:
    """A BERT encoder with random weights (the quick demo's): sized as the classifier's scratch models."""
    base = clf.scratch(tokenizer, 1, pooling, layers=layers, heads=heads, hidden=hidden, max_length=max_length)
    return LoadedEmbedder(SentenceEmbedder(base.model.encoder, pooling, normalize), tokenizer, base.config, True,
                          base.source)


def _pooled(tokens: np.ndarray, pooling: Pooling, normalize: bool) -> np.ndarray:
    """(T, C) token embeddings of real tokens -> (C,): the graph's pooling, in NumPy."""
    vector = {Pooling.CLS: lambda t: t[0], Pooling.MEAN: lambda t: t.mean(0), Pooling.MAX: lambda t: t.max(0)}[pooling](tokens)
    return vector / max(float(np.linalg.norm(vector)), 1e-12) if normalize else vector


def sentence_transformers_reference(
    folder: Path, texts: list[str], *, max_length: int, pooling: Pooling, normalize: bool, as_folder: bool
) -> np.ndarray:
    """sentence-transformers' own vectors for `texts`: its `encode` when the export keeps the folder's pooling
    and normalization (`as_folder`), else its token embeddings pooled here as the graph pools them (flags
    that override the folder change the vector, not the encoder or the tokenizer that this still checks)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ExportError("verifying a sentence-transformers folder needs the package sentence-transformers "
                          "(pip install 'nlpserve[export]')") from None
    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (it raises whatever its modules raise)
        raise ExportError(f"sentence-transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
    model.max_seq_length = max_length
    # prompt="": a folder's default prompt (e5's "query: ") is not part of the graph; the server embeds text as sent.
    with torch.inference_mode():
        if as_folder:
            return np.asarray(model.encode(texts, batch_size=len(texts), prompt="", convert_to_numpy=True), np.float32)
        tokens = model.encode(texts, batch_size=len(texts), prompt="", output_value="token_embeddings")
    return np.stack([_pooled(t.float().numpy(), pooling, normalize) for t in tokens]).astype(np.float32)


def similarity_check(embed: Any) -> dict[str, Any]:
    """Paraphrase pairs against unrelated pairs, through `embed(texts) -> (N, C)` (the exported graph)."""
    def scores(pairs: list[tuple[str, str]]) -> np.ndarray:
        vectors = embed([text for pair in pairs for text in pair])
        return cosine_rows(vectors[0::2], vectors[1::2])

    paraphrase, unrelated = scores(PARAPHRASES), scores(UNRELATED)
    return {
        "paraphrase_mean_cosine": round(float(paraphrase.mean()), 4),
        "unrelated_mean_cosine": round(float(unrelated.mean()), 4),
        "paraphrase_min_cosine": round(float(paraphrase.min()), 4),
        "unrelated_max_cosine": round(float(unrelated.max()), 4),
        "separated": bool(paraphrase.min() > unrelated.max()),
        "pairs": {"paraphrase": len(PARAPHRASES), "unrelated": len(UNRELATED)},
    }
