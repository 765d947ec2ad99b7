"""Token classification post-processing against transformers' TokenClassificationPipeline, on tiny random models.

Every strategy, on random and handwritten texts (accents, decomposed accents, CJK, emoji, long words, [UNK]s),
for a WordPiece tokenizer (real subwords) and a Unigram one (the pipeline's fallback heuristic). Where the
module's three documented fixes change nothing, the result must be the pipeline's; everywhere it must be that of
`FixedPipeline`, the pipeline with exactly those fixes, and the fixes' own tests show the pipeline's errors.
"""

from __future__ import annotations

import random
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.classify import softmax
from server.token_aggregation import STRATEGIES, Entity, TokenAggregator, Utf8Offsets, utf8_offsets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers.pipelines.token_classification import (
    AggregationStrategy,
    TokenClassificationPipeline,
)

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "MISC", "WORK-OF-ART"]
SENTENCES = [
    "José Müller visitó São Paulo con Ana",
    "Frau Schröder wohnt in Köln, Zürich und Genève.",
    "東京で会った 北京 大阪",
    "I ❤️ Paris 🇫🇷 and New York 🗽",
    "Microsoft, Apple and Siemens opened offices in Berlin.",
    "Angela Merkel met Emmanuel Macron in Brussels",
    "the quick brown fox jumps over the lazy dog",
]
HANDWRITTEN = [
    "José Müller visitó São Paulo",
    "東京で会った",
    "I ❤️ Paris 🇫🇷",
    "internationalization and supercalifragilisticexpialidocious",
    "Ωmega met жук in Berlin",  # characters the vocabulary lacks: one [UNK] for the whole word
    "Jose\u0301 Mu\u0308ller visito\u0301 Sa\u0303o Paulo",  # decomposed accents (NFD), as macOS writes them
    "Herr Mu\u0308ller",
    "Paris\nLondon\tBerlin  Köln",
    "Apple's CEO, Tim Cook; (Cupertino)...",
    "ÉCOLE Straße İstanbul",
    "Paris [MASK] Berlin",  # a special token typed in the text
]
SPECIALS = {"unk_token", "cls_token", "sep_token", "pad_token", "mask_token"}


def wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


def unigram() -> Tokenizer:
    """No continuing_subword_prefix: the pipeline's fallback heuristic decides what a word is."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token="[UNK]")
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return tokenizer


def handmade() -> Tokenizer:
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "ab", "##ab", "##c"]
    tokenizer = Tokenizer(
        models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


TOKENIZERS = {"wordpiece": wordpiece, "unigram": unigram, "handmade": handmade}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # A tiny model runs faster on one thread, and the test machines are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """(kind, seed) -> a directory with a tiny random BertForTokenClassification and its fast tokenizer."""
    made: dict[tuple[str, int], Path] = {}

    def make(kind: str, seed: int) -> Path:
        if (kind, seed) not in made:
            backend = TOKENIZERS[kind]()
            fast = transformers.PreTrainedTokenizerFast(
                tokenizer_object=backend, **{name: f"[{name[:-6].upper()}]" for name in SPECIALS}
            )
            torch.manual_seed(seed)
            config = transformers.BertConfig(
                vocab_size=backend.get_vocab_size(),
                hidden_size=32,
                num_hidden_layers=1 + seed % 2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
                id2label=dict(enumerate(LABELS)),
                label2id={label: i for i, label in enumerate(LABELS)},
                initializer_range=0.3 + 0.2 * seed,  # wide enough for confident, varied labels
            )
            path = tmp_path_factory.mktemp(f"{kind}{seed}")
            transformers.BertForTokenClassification(config).eval().save_pretrained(path)
            fast.save_pretrained(path)
            made[kind, seed] = path
        return made[kind, seed]

    return make


class FixedPipeline(TokenClassificationPipeline):
    """The pipeline with the three fixes of server/token_aggregation.py's docstring, and nothing else."""

    def gather_pre_entities(
        self, sentence, input_ids, scores, offset_mapping, special_tokens_mask, *args, **kw
    ):
        pre = super().gather_pre_entities(
            sentence, input_ids, scores, offset_mapping, special_tokens_mask, *args, **kw
        )
        backend = self.tokenizer.backend_tokenizer
        prefix = getattr(backend.model, "continuing_subword_prefix", None)
        words = self.tokenizer(sentence, truncation=True).word_ids()
        for k, entity in enumerate(pre):
            i, start = entity["index"], entity["start"]
            if int(input_ids[i]) == self.tokenizer.unk_token_id:
                entity["is_subword"] = False
            elif prefix:  # 1: the token carries the prefix and continues the previous token's word
                entity["is_subword"] = (
                    entity["word"].startswith(prefix) and words[i] is not None and words[i] == words[i - 1]
                )
            else:  # 2: any whitespace, not only " ", separates words
                entity["is_subword"] = start > 0 and not any(
                    c.isspace() for c in sentence[start - 1 : start + 1]
                )
            # 3: run on over what the normalizer deleted after the token
            limit = pre[k + 1]["start"] if k + 1 < len(pre) else len(sentence)
            while entity["end"] < limit and deleted(backend, sentence[entity["end"]]):
                entity["end"] += 1
        return pre


def deleted(backend: Tokenizer, char: str) -> bool:
    return not char.isspace() and backend.normalizer.normalize_str(char) == ""


def ordinary(backend: Tokenizer, text: str) -> bool:
    """Whether none of the fixes can apply: no character the normalizer deletes or shortens, no whitespace but " "."""
    return all(
        c == " " or (not c.isspace() and len(backend.normalizer.normalize_str(c).strip()) == 1) for c in text
    )


def pipeline_entities(pipe, text: str, strategy: str, ignore_labels, logits: np.ndarray | None = None):
    """The pipeline's postprocess of its own forward pass (or of the given logits), as `Entity`s."""
    return postprocessed(pipe, forward(pipe, text, logits), strategy, ignore_labels)


def forward(pipe, text: str, logits: np.ndarray | None = None) -> dict:
    """What pipe(text) computes before its postprocess: preprocess and forward, as the pipeline runs them."""
    (inputs,) = pipe.preprocess(text, is_split_into_words=False)
    outputs = pipe.forward(inputs)
    if logits is not None:
        outputs["logits"] = torch.from_numpy(logits)[None]
    return outputs


def postprocessed(pipe, outputs: dict, strategy: str, ignore_labels) -> list[Entity]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Tokenizer does not support real words, using fallback heuristic"
        found = pipe.postprocess(
            [outputs], aggregation_strategy=AggregationStrategy(strategy), ignore_labels=list(ignore_labels)
        )
    return as_entities(found)


def as_entities(found: list[dict]) -> list[Entity]:
    return [
        Entity(
            e.get("entity", e.get("entity_group")),
            float(e["score"]),
            e["start"],
            e["end"],
            e.get("index", -1),
        )
        for e in found
    ]


def assert_same(ours: list[Entity], theirs: list[Entity]) -> None:
    assert [(e.label, e.start, e.end, e.token_index) for e in ours] == [
        (e.label, e.start, e.end, e.token_index) for e in theirs
    ]
    np.testing.assert_allclose([e.score for e in ours], [e.score for e in theirs], rtol=0, atol=1e-5)


def probabilities_of(model, encoding) -> np.ndarray:
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([encoding.ids]),
            attention_mask=torch.tensor([encoding.attention_mask]),
            token_type_ids=torch.tensor([encoding.type_ids]),
        ).logits[0]
    return softmax(logits.numpy())


def random_texts(backend: Tokenizer, seed: int, count: int) -> list[str]:
    r = random.Random(seed)
    vocabulary = [t for t in backend.get_vocab() if not t.startswith(("##", "[", "▁")) and len(t) > 1]
    words = (
        vocabulary
        + [w for s in SENTENCES for w in s.split()]
        + list(",.;()'")
        + ["Ωmega", "supercalifragilistic"]
    )
    separators = [" "] * 8 + ["", ", ", "  "]
    texts = []
    for i in range(count):
        exotic = i % 5 == 0  # one in five with what the fixes are about
        chosen = [
            r.choice(words + ["Mu\u0308ller", "❤\ufe0f"] if exotic else words)
            for _ in range(r.randint(1, 24))
        ]
        texts.append(
            "".join(w + r.choice(separators + ["\n"] if exotic else separators) for w in chosen).strip()
        )
    return [t or "x" for t in texts]


@pytest.mark.parametrize(
    ("kind", "seed"), [("wordpiece", s) for s in range(4)] + [("unigram", s) for s in range(2)]
)
def test_every_strategy_gives_what_the_pipeline_gives(model_dir, kind, seed):
    path = model_dir(kind, seed)
    real = transformers.pipeline("token-classification", model=str(path))
    fixed = transformers.pipeline("token-classification", model=str(path), pipeline_class=FixedPipeline)
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))  # what the server reads
    aggregators = {ignore: TokenAggregator(backend, LABELS, ignore) for ignore in [("O",), ()]}
    compared = {"real": 0, "fixed only": 0, "non-empty": 0}
    batch, alone = [], {}
    for text in HANDWRITTEN + random_texts(backend, seed, 60):
        encoding = backend.encode(text)
        inputs = real.tokenizer(text, return_offsets_mapping=True)
        assert (
            inputs["input_ids"] == encoding.ids
            and [tuple(o) for o in inputs["offset_mapping"]] == encoding.offsets
        )
        outputs = forward(real, text)  # one forward pass serves both pipelines and us
        assert outputs["input_ids"][0].tolist() == encoding.ids
        probabilities = softmax(outputs["logits"][0].numpy())
        batch.append((text, encoding, probabilities))
        for strategy in STRATEGIES:
            for ignore, aggregator in aggregators.items():
                ours = aggregator.entities(text, encoding, probabilities, strategy)
                alone.setdefault((strategy, ignore), []).append(ours)
                assert_same(ours, postprocessed(fixed, outputs, strategy, ignore))
                if ordinary(backend, text):
                    assert_same(ours, postprocessed(real, outputs, strategy, ignore))
                    compared["real"] += 1
                else:
                    compared["fixed only"] += 1
                compared["non-empty"] += bool(ours) and bool(ignore)
                for entity in ours:
                    assert 0 <= entity.start < entity.end <= len(text)
                    if kind == "wordpiece":  # (a Metaspace token's offsets take in the space before it)
                        assert not text[entity.start].isspace() and not text[entity.end - 1].isspace()
                    # No accent or selector is left just outside an entity.
                    assert entity.end == len(text) or not unicodedata.combining(text[entity.end])
                    assert entity.end == len(text) or text[entity.end] != "\ufe0f"
    assert compared["real"] > 400 and compared["fixed only"] > 20 and compared["non-empty"] > 200, compared
    # A whole batch at once: the same, text by text (with texts that have no tokens but special ones).
    empty = ("", backend.encode(""), np.zeros((2, len(LABELS)), np.float32))
    batch = [empty, *batch[:30], empty, *batch[30:], empty]
    for (strategy, ignore), expected in alone.items():
        found = aggregators[ignore].entities_batch(*zip(*batch), strategy)
        assert found == [[], *expected[:30], [], *expected[30:], []]


def test_the_direct_call_path_is_the_one_compared(model_dir):
    # pipeline_entities (preprocess, forward, postprocess) is what pipeline(text) runs.
    pipe = transformers.pipeline("token-classification", model=str(model_dir("wordpiece", 0)))
    for text in HANDWRITTEN:
        for strategy in STRATEGIES:
            assert_same(
                as_entities(pipe(text, aggregation_strategy=strategy)),
                pipeline_entities(pipe, text, strategy, ["O"]),
            )


def test_truncated_encodings(model_dir):
    path = model_dir("wordpiece", 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), model_max_length=9)
    real = transformers.pipeline("token-classification", model=str(path), tokenizer=tokenizer)
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.enable_truncation(9)
    aggregator = TokenAggregator(backend, LABELS, ())
    for text in [t for t in HANDWRITTEN + random_texts(backend, 7, 20) if ordinary(backend, t)]:
        encoding = backend.encode(text)
        assert len(encoding.ids) <= 9
        probabilities = probabilities_of(real.model, encoding)
        for strategy in STRATEGIES:
            ours = aggregator.entities(text, encoding, probabilities, strategy)
            assert_same(ours, pipeline_entities(real, text, strategy, ()))
            assert ours and ours[-1].end <= encoding.offsets[-2][1]  # nothing past the cut


def one_hot_logits(backend: Tokenizer, text: str, labels: list[str]) -> np.ndarray:
    """Logits that make each non-special token (in order) take the given label, near-certainly."""
    encoding = backend.encode(text)
    logits = np.zeros((len(encoding.ids), len(LABELS)), dtype=np.float32)
    rows = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    assert len(rows) == len(labels), encoding.tokens
    logits[rows, [LABELS.index(label) for label in labels]] = 8
    return logits


@pytest.fixture(scope="module")
def wordpiece_pipelines(model_dir):
    path = model_dir("wordpiece", 0)
    real = transformers.pipeline("token-classification", model=str(path))
    fixed = transformers.pipeline("token-classification", model=str(path), pipeline_class=FixedPipeline)
    return real, fixed, Tokenizer.from_file(str(path / "tokenizer.json"))


def test_fix_1_a_decomposed_accent_does_not_glue_words(wordpiece_pipelines):
    real, fixed, backend = wordpiece_pipelines
    text = "Herr Mu\u0308ller"  # tokens "h", "##er", "##r", "muller": "muller" spans 7 characters
    logits = one_hot_logits(backend, text, ["B-PER", "I-PER", "I-PER", "B-PER"])
    ours = TokenAggregator(backend, LABELS).entities(text, backend.encode(text), softmax(logits), "first")
    assert [(e.label, e.start, e.end) for e in ours] == [("PER", 0, 4), ("PER", 5, 12)]
    assert_same(ours, pipeline_entities(fixed, text, "first", ["O"], logits))
    # The pipeline takes "muller" for a subword of "herr": one word, one entity.
    assert [(e.label, e.start, e.end) for e in pipeline_entities(real, text, "first", ["O"], logits)] == [
        ("PER", 0, 12)
    ]


def test_fix_2_a_newline_separates_words(model_dir):
    path = model_dir("unigram", 0)
    real = transformers.pipeline("token-classification", model=str(path))
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Paris\nBerlin"
    encoding = backend.encode(text)
    labels = [
        "B-LOC" if start in (0, 6) else "O" if text[start:end].isspace() else "I-LOC"
        for (start, end), special in zip(encoding.offsets, encoding.special_tokens_mask)
        if not special
    ]
    logits = one_hot_logits(backend, text, labels)
    ours = TokenAggregator(backend, LABELS).entities(text, encoding, softmax(logits), "first")
    assert [(e.label, text[e.start : e.end]) for e in ours] == [("LOC", "Paris"), ("LOC", "Berlin")]
    # The vocabulary lacks "\n": an [UNK], which starts a word; the pipeline reads "\nBerlin" as that word, so
    # Berlin takes the newline's label, and is lost.
    assert [(e.label, e.start, e.end) for e in pipeline_entities(real, text, "first", ["O"], logits)] == [
        ("LOC", 0, 5)
    ]


def test_fix_3_an_entity_keeps_its_trailing_accent_and_selector(wordpiece_pipelines):
    real, _, backend = wordpiece_pipelines
    text = "Jose\u0301 ❤\ufe0f"
    encoding = backend.encode(text)
    assert encoding.tokens == ["[CLS]", "jose", "❤", "[SEP]"] and encoding.offsets[1:3] == [(0, 4), (6, 7)]
    logits = one_hot_logits(backend, text, ["B-PER", "MISC"])
    for strategy in STRATEGIES:
        ours = TokenAggregator(backend, LABELS).entities(text, encoding, softmax(logits), strategy)
        assert [text[e.start : e.end] for e in ours] == ["Jose\u0301", "❤\ufe0f"]
        assert [(e.start, e.end) for e in pipeline_entities(real, text, strategy, ["O"], logits)] == [
            (0, 4),
            (6, 7),
        ]


def test_max_takes_the_first_of_equally_confident_tokens(wordpiece_pipelines):
    real, _, backend = wordpiece_pipelines
    text = "supercalifragilistic Paris"
    encoding = backend.encode(text)
    pieces = len(encoding.ids) - 3
    assert pieces > 3 and encoding.tokens[-2] == "paris"
    # Every piece of the long word is as confident, each of another label: the first one's label wins.
    labels = ["B-ORG", "B-LOC", *(["I-PER"] * (pieces - 2)), "B-LOC"]
    logits = one_hot_logits(backend, text, labels)
    ours = TokenAggregator(backend, LABELS).entities(text, encoding, softmax(logits), "max")
    assert [(e.label, text[e.start : e.end]) for e in ours] == [
        ("ORG", "supercalifragilistic"),
        ("LOC", "Paris"),
    ]
    assert_same(ours, pipeline_entities(real, text, "max", ["O"], logits))


def test_a_word_may_start_with_the_prefix(model_dir):
    # Split at whitespace only, "##ab" is a word, and WordPiece finds it whole in the vocabulary: it carries the
    # prefix, yet starts a word (the pipeline agrees: the token is as long as its span).
    path = model_dir("handmade", 0)
    real = transformers.pipeline("token-classification", model=str(path))
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "x ##ab abc"
    encoding = backend.encode(text)
    assert encoding.tokens == ["[CLS]", "x", "##ab", "ab", "##c", "[SEP]"]
    logits = one_hot_logits(backend, text, ["B-PER", "B-LOC", "B-ORG", "I-PER"])
    for strategy in STRATEGIES:
        ours = TokenAggregator(backend, LABELS).entities(text, encoding, softmax(logits), strategy)
        assert_same(ours, pipeline_entities(real, text, strategy, ["O"], logits))
        if strategy == "first":
            assert [text[e.start : e.end] for e in ours] == ["x", "##ab", "abc"]


def test_pipeline_quirks_that_are_kept(wordpiece_pipelines):
    real, _, backend = wordpiece_pipelines
    text = "Angela Merkel met Emmanuel Macron in Brussels"
    labels = ["I-PER", "B-PER", "O", "MISC", "MISC", "WORK-OF-ART", "B-LOC"]
    assert len(backend.encode(text).ids) == len(labels) + 2
    logits = one_hot_logits(backend, text, labels)
    for ignore, expected in [
        # A group may start with I-; consecutive B- never merge; a bare label groups as an I-; everything up to
        # the first "-" goes from a group's label ("WORK-OF-ART" -> "OF-ART").
        (
            ["O"],
            [
                ("PER", "Angela"),
                ("PER", "Merkel"),
                ("MISC", "Emmanuel Macron"),
                ("OF-ART", "in"),
                ("LOC", "Brussels"),
            ],
        ),
        # In the grouping strategies ignore_labels are compared with the group's label, not the tokens'.
        (["O", "B-PER", "PER"], [("MISC", "Emmanuel Macron"), ("OF-ART", "in"), ("LOC", "Brussels")]),
        (
            ["O", "B-PER", "I-PER"],
            [
                ("PER", "Angela"),
                ("PER", "Merkel"),
                ("MISC", "Emmanuel Macron"),
                ("OF-ART", "in"),
                ("LOC", "Brussels"),
            ],
        ),
    ]:
        ours = TokenAggregator(backend, LABELS, ignore).entities(
            text, backend.encode(text), softmax(logits), "simple"
        )
        assert [(e.label, text[e.start : e.end]) for e in ours] == expected
        assert_same(ours, pipeline_entities(real, text, "simple", ignore, logits))
    # "none" compares ignore_labels with each token's label.
    ours = TokenAggregator(backend, LABELS, ["O", "B-PER"]).entities(
        text, backend.encode(text), softmax(logits), "none"
    )
    assert [e.label for e in ours] == ["I-PER", "MISC", "MISC", "WORK-OF-ART", "B-LOC"]
    assert [e.token_index for e in ours] == [1, 4, 5, 6, 7]


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_label_sequences(wordpiece_pipelines, data):
    real, fixed, backend = wordpiece_pipelines
    words = st.sampled_from(
        [w for s in SENTENCES for w in s.split()] + ["internationalization", "Mu\u0308ller", "Ωmega"]
    )
    text = " ".join(data.draw(st.lists(words, min_size=1, max_size=12)))
    encoding = backend.encode(text)
    labels = data.draw(
        st.lists(st.sampled_from(LABELS), min_size=len(encoding.ids) - 2, max_size=len(encoding.ids) - 2)
    )
    noise = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).normal(
        0, 1, (len(encoding.ids), len(LABELS))
    )
    logits = one_hot_logits(backend, text, labels) * data.draw(
        st.sampled_from([0.2, 0.5, 1.0])
    ) + noise.astype(np.float32)
    strategy = data.draw(st.sampled_from(STRATEGIES))
    ignore = data.draw(st.sampled_from([("O",), (), ("O", "MISC", "B-PER")]))
    ours = TokenAggregator(backend, LABELS, ignore).entities(text, encoding, softmax(logits), strategy)
    assert_same(ours, pipeline_entities(fixed, text, strategy, ignore, logits))
    if ordinary(backend, text):
        assert_same(ours, pipeline_entities(real, text, strategy, ignore, logits))


def test_offsets_are_characters_of_the_original_text():
    backend = wordpiece()
    for text in HANDWRITTEN + SENTENCES:
        encoding = backend.encode(text)
        for token, (start, end), special in zip(
            encoding.tokens, encoding.offsets, encoding.special_tokens_mask
        ):
            if special:
                assert (start, end) == (0, 0)
            elif token not in ("[UNK]", "[MASK]"):  # (added tokens are matched in the text as they are)
                # Character (code point) offsets into the original: its span normalizes to the token.
                assert backend.normalizer.normalize_str(text[start:end]).strip() == token.removeprefix("##")
    text = "José 東京 ❤️"
    assert backend.encode(text).offsets[1:-1] == [
        (0, 4),
        (5, 6),
        (6, 7),
        (8, 9),
    ]  # not UTF-8 bytes: (0, 5)...


@pytest.mark.parametrize(
    "text", ["plain ascii", "José Müller visitó São Paulo", "東京で会った", "I ❤️ Paris 🇫🇷 😀", "Jose\u0301"]
)
def test_utf8_offsets(text):
    data = text.encode("utf-8")
    to_bytes = Utf8Offsets(text)
    for start in range(len(text) + 1):
        for end in range(start, len(text) + 1):
            expected = (len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8")))
            assert utf8_offsets(text, start, end) == to_bytes(start, end) == expected
            assert data[expected[0] : expected[1]].decode("utf-8") == text[start:end]


@settings(max_examples=100, derandomize=True)
@given(text=st.text(max_size=40), cut=st.tuples(st.integers(0, 40), st.integers(0, 40)))
def test_utf8_offsets_of_any_text(text, cut):
    start, end = sorted(min(c, len(text)) for c in cut)
    expected = (len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8")))
    assert utf8_offsets(text, start, end) == Utf8Offsets(text)(start, end) == expected


def test_bad_arguments():
    backend = wordpiece()
    aggregator = TokenAggregator(backend, LABELS)
    encoding = backend.encode("hello")
    with pytest.raises(ValueError, match="strategy"):
        aggregator.entities(
            "hello", encoding, np.zeros((len(encoding.ids), len(LABELS)), np.float32), "longest"
        )
    with pytest.raises(ValueError, match="shape"):
        aggregator.entities("hello", encoding, np.zeros((len(encoding.ids), 3), np.float32), "none")
    empty = backend.encode("")
    assert aggregator.entities("", empty, np.zeros((len(empty.ids), len(LABELS)), np.float32), "simple") == []
