"""Qwen3-Reranker on Hugging Face transformers: the CPU fallback and the reference for the vLLM engine.

The rule is the model card's: prompt = PREFIX + "<Instruct>: ...\\n<Query>: ...\\n<Document>: ..." + SUFFIX, with
the middle part tokenized on its own and cut from its end so the whole prompt fits `max_length`; the score is the
softmax over the "no"/"yes" logits at the last position, keeping P(yes).

Batches are padded on the right and each row is read at its own last token. With a causal mask, pads after a row's
last token cannot change it and positions start at 0 in every row, so a pair scores the same alone or in any batch.
Only the two rows of the LM head that matter are applied, instead of the full 151k-token vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.chunks import PairOptions
from schemas.errors import EngineLoadError, InvalidInput
from schemas.prompt import PREFIX, SUFFIX, format_body
from schemas.settings import Settings
from workers.engines.base import Pair, Window

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("yes", "no") if t not in vocab]
        if missing:
            raise EngineLoadError(f"the tokenizer has no token for {missing}: this is not a Qwen3-Reranker checkpoint")
        self.prefix_ids: list[int] = tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.body_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_budget < 16:
            raise EngineLoadError(f"RERANK_MAX_LENGTH={max_length} leaves no room for a query and a document")
        head = model.get_output_embeddings().weight
        ids = [vocab["no"], vocab["yes"]]
        self.head = head[ids].detach().clone()  # [2, hidden]: rows of "no" and "yes"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, settings: Settings) -> TransformersEngine:
        device: str = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("RERANK_DEVICE=cuda but torch sees no CUDA device")
        dtype_name = settings.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device == "cuda" else "float32"
        try:
            tokenizer = AutoTokenizer.from_pretrained(settings.model)
            model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=_DTYPES[dtype_name])
        except (OSError, ValueError) as exc:
            raise EngineLoadError(
                f"could not load model {settings.model!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
                "If this machine cannot reach the Hugging Face Hub, download the model where it can "
                "(`hf download Qwen/Qwen3-Reranker-0.6B --local-dir DIR`) and set RERANK_MODEL=DIR; "
                "check that RERANK_MODEL names a model id or a directory with config.json and tokenizer files."
            ) from None
        tokenizer.truncation_side = "right"
        max_length = settings.max_length
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and max_length > positions:
            logger.warning(
                "RERANK_MAX_LENGTH=%d exceeds the model's %d positions; using %d", max_length, positions, positions
            )
            max_length = positions
        model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types `to` too narrowly
        logger.info("transformers engine ready: model=%s device=%s dtype=%s", settings.model, device, dtype_name)
        return cls(model, tokenizer, max_length, device)

    def _budget(self, options: PairOptions) -> int:
        if options.max_prompt_tokens is None:
            return self.body_budget
        budget = min(self.body_budget, options.max_prompt_tokens - len(self.prefix_ids) - len(self.suffix_ids))
        if budget < 8:
            raise InvalidInput(f"a prompt limit of {options.max_prompt_tokens} tokens leaves no room for the text")
        return budget

    def _cut(self, text: str, tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else str(self.tokenizer.decode(ids[:tokens]))

    def encode(self, pairs: Sequence[Pair], options: PairOptions | None = None) -> list[list[int]]:
        options = options or PairOptions()
        budget = self._budget(options)
        docs = [p.document for p in pairs]
        if options.max_doc_tokens is not None:
            docs = [self._cut(d, options.max_doc_tokens) for d in docs]
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
        room = self._budget(options) - len(
            self.tokenizer(format_body(pair.query, "", pair.instruction), add_special_tokens=False)["input_ids"]
        )
        if room < 8:
            raise InvalidInput("the query and instruction leave no room for a document window")
        size = min(options.window_tokens or room, room)
        doc = self.tokenizer(pair.document, add_special_tokens=False)["input_ids"]
        if len(doc) <= size:
            return [Window(self.encode([pair], options.model_copy(update={"truncate": True}))[0], 0, len(doc))]
        step = max(1, size - options.window_overlap)
        windows = []
        for start in range(0, len(doc), step):
            piece = doc[start : start + size]
            text = str(self.tokenizer.decode(piece))
            body = format_body(pair.query, text, pair.instruction)
            ids = self.tokenizer(body, add_special_tokens=False, truncation=True, max_length=self._budget(options))
            windows.append(Window(self.prefix_ids + ids["input_ids"] + self.suffix_ids, start, start + len(piece)))
            if start + size >= len(doc):
                break
        return windows

    @torch.inference_mode()
    def score(self, batch: Sequence[Sequence[int]]) -> list[float]:
        if not batch:
            return []
        lengths = torch.tensor([len(x) for x in batch])
        ids = torch.full((len(batch), int(lengths.max())), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        hidden = self.model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        last = hidden[torch.arange(len(batch), device=hidden.device), (lengths - 1).to(hidden.device)]
        logits = (last @ self.head.T).float()  # [batch, 2] = ("no", "yes") logits, as the full LM head gives them
        return torch.softmax(logits, dim=-1)[:, 1].tolist()
