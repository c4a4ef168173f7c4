"""Rerankers on Hugging Face transformers: the fallback engine (CPU or GPU) and the reference for vLLM.

Each family's rule is its card's (`workers.models`). Qwen3-Reranker: the softmax over the "no"/"yes" logits at the
last position of the prompt (built by `workers.prompts`), keeping P(yes). Cross-encoders: the sigmoid of the
sequence classifier's one logit, with the token types the card derives for two-segment models.

Batches are padded on the right and each row is read at its own last token. With a causal mask, pads after a row's
last token cannot change it and positions start at 0 in every row, so a pair scores the same alone or in any batch.
Only the two rows of the LM head that matter are applied, instead of the full 151k-token vocabulary. Submissions are
gathered into padded, length-sorted passes by the engine's own batcher (`workers.engines.batcher`), one at a time:
a padded pass uses every core (or the whole GPU) by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from schemas.errors import EngineLoadError
from schemas.settings import Settings
from workers.engines.base import EngineStats, Scoring
from workers.engines.batcher import Batcher
from workers.prompts import Prompts

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    name = "transformers"

    def __init__(
        self, model: Any, prompts: Prompts, device: str, max_batch_tokens: int, batch_window: int = 8, name: str = ""
    ) -> None:
        self.model = model
        self.device = device
        self.prompts = prompts
        self.head: torch.Tensor | None = None
        if prompts.label_ids is not None:  # a causal LM (Qwen3-Reranker): [2, hidden], its head's rows of "no", "yes"
            self.head = model.get_output_embeddings().weight[list(prompts.label_ids)].detach().clone()
        self.pad_id = prompts.pad_id
        self.stats = EngineStats(model=name)
        self.batcher = Batcher(self.score, max_batch_tokens, self.stats, lookahead_batches=batch_window)
        self._closed = False

    @classmethod
    def load(cls, settings: Settings, prompts: Prompts) -> TransformersEngine:
        """The model on its device, loaded as its family wants; the label rows and the pad id come from the prompt
        builder's tokenizer."""
        device: str = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("RERANK_DEVICE=cuda but torch sees no CUDA device")
        dtype_name = settings.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device == "cuda" else "float32"
        try:
            auto = AutoModelForCausalLM if prompts.card.causal_lm else AutoModelForSequenceClassification
            model = auto.from_pretrained(settings.model, dtype=_DTYPES[dtype_name])
        except (OSError, ValueError) as exc:
            raise EngineLoadError.model_unloadable(settings.model, exc) from None
        model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types `to` too narrowly
        logger.info("transformers engine ready: model=%s device=%s dtype=%s", settings.model, device, dtype_name)
        return cls(model, prompts, device, settings.max_batch_tokens, settings.batch_window, settings.served_name)

    def submit(self, prompts: Sequence[Sequence[int]], priority: int = 0) -> Scoring:
        if self._closed:
            raise RuntimeError("the transformers engine is closed")
        return self.batcher.submit(prompts, priority)

    def health(self) -> str | None:
        if self._closed:
            return "closed"
        return None if self.batcher.alive() else "the batcher thread has stopped"

    def close(self) -> None:
        self._closed = True
        self.batcher.stop()
        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def score(self, batch: Sequence[Sequence[int]]) -> list[float]:
        """One padded forward pass, now, on this thread (the batcher's passes, and the benchmarks' raw run)."""
        if self.model is None:
            raise RuntimeError("the transformers engine is closed")
        if not batch:
            return []
        lengths = torch.tensor([len(x) for x in batch])
        ids = torch.full((len(batch), int(lengths.max())), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        if self.head is None:  # a cross-encoder: the sigmoid of its one logit
            inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
            starts = [self.prompts.document_start(x) for x in batch]
            if starts[0] is not None:
                types = torch.zeros_like(ids)
                for row, start in enumerate(starts):
                    types[row, start : len(batch[row])] = 1
                inputs["token_type_ids"] = types.to(self.device)
            return torch.sigmoid(self.model(**inputs).logits[:, 0].float()).tolist()
        hidden = self.model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        last = hidden[torch.arange(len(batch), device=hidden.device), (lengths - 1).to(hidden.device)]
        logits = (last @ self.head.T).float()  # [batch, 2] = ("no", "yes") logits, as the full LM head gives them
        return torch.softmax(logits, dim=-1)[:, 1].tolist()
