"""How a (query, document) pair becomes the token ids an engine scores: the one place prompts are built, for each
model family (`load_prompts` picks the builder): `PromptBuilder` for Qwen3-Rerankers, `PairPromptBuilder` for
cross-encoders.

Qwen3-Reranker:
The text is the model card's (`workers.models.qwen3_reranker`): PREFIX + "<Instruct>: ...\\n<Query>: ...\\n<Document>:
..." + SUFFIX. The middle part is tokenized on its own and cut from its end so the whole prompt fits the max length
(with `truncate_left`, the document loses its start instead); PREFIX and SUFFIX are never cut, so every prompt ends
with the assistant turn the yes/no logits are read after. Engines only see token ids, so the transformers and vLLM
engines score exactly the same prompts.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from schemas.chunks import PairOptions
from schemas.errors import EngineLoadError, InvalidInput
from schemas.settings import Settings
from workers.models import Family, FamilyCard, card, family_of
from workers.models.cross_encoder import document_start
from workers.models.qwen3_reranker import PREFIX, SUFFIX, format_body, label_ids

logger = logging.getLogger(__name__)


class Pair(NamedTuple):
    query: str
    document: str
    instruction: str | None = None


class Window(NamedTuple):
    """One window of a long document: its prompt and the document tokens [start, end) it holds."""

    token_ids: list[int]
    start: int
    end: int


def _load(model: str, max_length: int) -> tuple[Any, Any, int]:
    """The model's tokenizer and config, and `max_length` capped to the model's positions."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise EngineLoadError.model_unloadable(model, exc) from None
    tokenizer.truncation_side = "right"
    positions = getattr(config, "max_position_embeddings", None)
    if positions and max_length > positions:
        logger.warning(
            "RERANK_MAX_LENGTH=%d exceeds the model's %d positions; using %d", max_length, positions, positions
        )
        max_length = positions
    return tokenizer, config, max_length


class TokenPrompts(ABC):
    """What both families' builders share: the tokenizer and max length, the pad id, cutting a text to a number of
    tokens, and splitting a long document into windows. Thread-safe (fast tokenizers are)."""

    family: Family
    label_ids: tuple[int, int] | None = None  # tokens whose LM-head rows score a pair (no, yes); None: a classifier

    @property
    def card(self) -> FamilyCard:
        """The family's card: how the engines load the model, its default instruction."""
        return card(self.family)

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    @abstractmethod
    def encode(self, pairs: Sequence[Pair], options: PairOptions | None = None) -> list[list[int]]:
        """The token ids of each pair's prompt."""

    @abstractmethod
    def document_start(self, ids: Sequence[int]) -> int | None:
        """Where token type 1 starts in a prompt (two-segment models); None for the others."""

    @abstractmethod
    def _room(self, pair: Pair, budget: int) -> int:
        """Document tokens that fit beside the rest of the pair's prompt, in `budget` tokens."""

    @property
    def pad_id(self) -> int:
        pad: int | None = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cut(self, text: str, tokens: int, keep_end: bool = False) -> str:
        ids = self._ids(text)
        if len(ids) <= tokens:
            return text
        return str(self.tokenizer.decode(ids[len(ids) - tokens :] if keep_end else ids[:tokens]))

    def _documents(self, pairs: Sequence[Pair], options: PairOptions, budget: int) -> list[str]:
        """The pairs' documents, cut first to `max_doc_tokens`, then, with `truncate_left`, to their end that fits
        (the prompt's own truncation then only trims)."""
        docs = [p.document for p in pairs]
        if options.max_doc_tokens is not None:
            docs = [self._cut(d, options.max_doc_tokens) for d in docs]
        if options.truncate and options.truncate_left:
            docs = [
                self._cut(d, max(1, self._room(p, budget)), keep_end=True) for p, d in zip(pairs, docs, strict=True)
            ]
        return docs

    def _split_windows(
        self, pair: Pair, options: PairOptions, room: int, prompt: Callable[[str], list[int]]
    ) -> list[Window]:
        """A long document's overlapping windows of up to `room` document tokens (`options.window_tokens` when
        smaller), each made a prompt by `prompt(window text)`; one window, the `encode` prompt, when it fits."""
        size = min(options.window_tokens or room, room)
        document = pair.document
        if options.max_doc_tokens is not None:  # "cut each document first", windows or not
            document = self._cut(document, options.max_doc_tokens)
        doc = self._ids(document)
        if len(doc) <= size:  # fits beside the query: the one prompt truncate mode would score
            return [Window(self.encode([pair], options)[0], 0, len(doc))]
        step = max(1, size - options.window_overlap)
        windows = []
        for start in range(0, len(doc), step):
            piece = doc[start : start + size]
            windows.append(Window(prompt(str(self.tokenizer.decode(piece))), start, start + len(piece)))
            if start + size >= len(doc):
                break
        return windows


class PromptBuilder(TokenPrompts):
    """Qwen3-Reranker prompts' token ids for one tokenizer and max length."""

    family: Family = "qwen3-reranker"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        super().__init__(tokenizer, max_length)
        self.label_ids = label_ids(tokenizer.get_vocab())  # ("no", "yes")
        self.prefix_ids: list[int] = tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.body_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_budget < 16:
            raise EngineLoadError(f"RERANK_MAX_LENGTH={max_length} leaves no room for a query and a document")

    @classmethod
    def from_pretrained(cls, model: str, max_length: int) -> PromptBuilder:
        """The model's tokenizer, with `max_length` capped to the model's positions."""
        tokenizer, _, max_length = _load(model, max_length)
        return cls(tokenizer, max_length)

    def document_start(self, ids: Sequence[int]) -> int | None:
        """Where token type 1 starts: never (one segment)."""
        return None

    def _budget(self, options: PairOptions) -> int:
        if options.max_prompt_tokens is None:
            return self.body_budget
        budget = min(self.body_budget, options.max_prompt_tokens - len(self.prefix_ids) - len(self.suffix_ids))
        if budget < 8:
            raise InvalidInput(f"a prompt limit of {options.max_prompt_tokens} tokens leaves no room for the text")
        return budget

    def _room(self, pair: Pair, budget: int) -> int:
        """Document tokens that fit beside the pair's query and instruction."""
        return budget - len(self._ids(format_body(pair.query, "", pair.instruction)))

    def encode(self, pairs: Sequence[Pair], options: PairOptions | None = None) -> list[list[int]]:
        """Prompt token ids for each pair, cut to the max length (or InvalidInput when `options.truncate` is false
        and a prompt is too long)."""
        options = options or PairOptions()
        budget = self._budget(options)
        docs = self._documents(pairs, options, budget)
        bodies = [format_body(p.query, d, p.instruction) for p, d in zip(pairs, docs, strict=True)]
        if options.truncate:
            enc = self.tokenizer(bodies, add_special_tokens=False, truncation=True, max_length=budget)
        else:
            enc = self.tokenizer(bodies, add_special_tokens=False)
            longest = max(len(ids) for ids in enc["input_ids"])
            if longest > budget:
                total = longest + len(self.prefix_ids) + len(self.suffix_ids)
                limit = budget + len(self.prefix_ids) + len(self.suffix_ids)
                raise InvalidInput(f"a prompt has {total} tokens, over the limit of {limit}, and truncation is off")
        return [self.prefix_ids + ids + self.suffix_ids for ids in enc["input_ids"]]

    def windows(self, pair: Pair, options: PairOptions) -> list[Window]:
        """Prompts for overlapping windows of a long document; one window (the `encode` prompt) when it fits."""
        budget = self._budget(options)
        room = self._room(pair, budget)
        if room < 8:
            raise InvalidInput("the query and instruction leave no room for a document window")

        def prompt(text: str) -> list[int]:
            body = format_body(pair.query, text, pair.instruction)
            ids = self.tokenizer(body, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
            return self.prefix_ids + ids + self.suffix_ids

        return self._split_windows(pair, options, room, prompt)


class PairPromptBuilder(TokenPrompts):
    """Cross-encoder inputs' token ids: the tokenizer's own pair encoding of (query, document), special tokens
    included, cut to the max length from the document's end (or start, `truncate_left`). The instruction is not
    part of the input."""

    family: Family = "cross-encoder"

    def __init__(self, tokenizer: Any, max_length: int, two_segments: bool) -> None:
        super().__init__(tokenizer, max_length)
        self.specials = tokenizer.num_special_tokens_to_add(pair=True)
        self.sep_id: int = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.two_segments = two_segments  # the model reads token types (BERT); XLM-RoBERTa has one
        if max_length - self.specials < 16:
            raise EngineLoadError(f"RERANK_MAX_LENGTH={max_length} leaves no room for a query and a document")

    def document_start(self, ids: Sequence[int]) -> int | None:
        """Where token type 1 starts in a prompt, for two-segment models; None for the others."""
        return document_start(ids, self.sep_id) if self.two_segments else None

    def _budget(self, options: PairOptions) -> int:
        budget = (
            self.max_length if options.max_prompt_tokens is None else min(self.max_length, options.max_prompt_tokens)
        )
        if budget - self.specials < 8:
            raise InvalidInput(f"a prompt limit of {options.max_prompt_tokens} tokens leaves no room for the text")
        return budget

    def _room(self, pair: Pair, budget: int) -> int:
        """Document tokens that fit beside the query."""
        return budget - self.specials - len(self._ids(pair.query))

    def encode(self, pairs: Sequence[Pair], options: PairOptions | None = None) -> list[list[int]]:
        """Token ids of each pair, cut to the max length (or InvalidInput when `options.truncate` is false and a
        pair is too long)."""
        options = options or PairOptions()
        budget = self._budget(options)
        docs = self._documents(pairs, options, budget)
        queries = [p.query for p in pairs]
        if options.truncate:
            enc = self.tokenizer(queries, docs, truncation="longest_first", max_length=budget)
        else:
            enc = self.tokenizer(queries, docs)
            longest = max(len(ids) for ids in enc["input_ids"])
            if longest > budget:
                raise InvalidInput(f"a prompt has {longest} tokens, over the limit of {budget}, and truncation is off")
        return [list(ids) for ids in enc["input_ids"]]

    def windows(self, pair: Pair, options: PairOptions) -> list[Window]:
        """Inputs for overlapping windows of a long document; one window (the `encode` input) when it fits."""
        budget = self._budget(options)
        room = self._room(pair, budget)
        if room < 8:
            raise InvalidInput("the query leaves no room for a document window")

        def prompt(text: str) -> list[int]:
            return list(self.tokenizer(pair.query, text, truncation="longest_first", max_length=budget)["input_ids"])

        return self._split_windows(pair, options, room, prompt)


Prompts = PromptBuilder | PairPromptBuilder


def load_prompts(settings: Settings, model: str | None = None) -> Prompts:
    """The prompt builder of the worker's model (or `model`), for its family (RERANK_MODEL_FAMILY, or its config)."""
    tokenizer, config, max_length = _load(model or settings.model, settings.max_length)
    family = family_of(config) if settings.model_family == "auto" else settings.model_family
    if family == "cross-encoder":
        return PairPromptBuilder(tokenizer, max_length, getattr(config, "type_vocab_size", 1) > 1)
    return PromptBuilder(tokenizer, max_length)
