"""Tiny random rerankers with word-level tokenizers, built locally: for tests, benchmarks on the CPU and trying the
farm on a machine that cannot download the real models. Their scores are meaningless but follow the real code paths:
a Qwen3 reranker (`build_tiny_model`: same architecture family, same prompt, same yes/no rule) and a BERT
cross-encoder (`build_tiny_cross_encoder`: a pair with two segments, one logit)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.models.qwen3_reranker import PREFIX, SUFFIX, format_body

VOCAB_WORDS = 500
HEAD_DIM = 32  # vLLM's CPU attention refuses 16; a model built by an older release is rebuilt


def _prompt_words() -> list[str]:
    """The words of the prompt template, as the tokenizer splits them (special tokens stand alone)."""
    text = PREFIX + format_body("", "") + SUFFIX
    for special in ("<|im_start|>", "<|im_end|>"):
        text = text.replace(special, f" {special} ")
    return text.split()


def _vocab(path: Path) -> str:
    try:
        return (path / "tokenizer.json").read_text()
    except OSError:
        return ""


def _head_dim(path: Path) -> int | None:
    try:
        value = json.loads((path / "config.json").read_text()).get("head_dim")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


# The shape both tiny models share: two small layers.
TINY_LAYERS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def _word_level(words: list[str], unk_token: str, post_processor: Any = None, **special: Any) -> Any:
    """A word-level tokenizer over `words` (ids in order, duplicates dropped), splitting on whitespace, with the
    given post-processor and special tokens, as transformers loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post_processor is not None:
        tok.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk_token, **special)


def _save(path: Path, seed: int, model: Callable[[], Any], tokenizer: Any) -> Path:
    """Random weights from `seed` (`model()` builds them) and the tokenizer, written to `path`."""
    import torch

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_model(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write config, random weights and tokenizer to `directory` (kept if already built) and return it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(directory)
    if (path / "tokenizer.json").exists() and _head_dim(path) == HEAD_DIM and '"assistant"' in _vocab(path):
        return path
    words = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "yes", "no"]
    words += sorted({w for w in _prompt_words()} | {f"w{i}" for i in range(VOCAB_WORDS)})
    hf_tok = _word_level(
        words,
        "<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],  # as in Qwen's tokenizer: split off the word after it
    )
    cfg = Qwen3Config(
        vocab_size=len(hf_tok),
        **TINY_LAYERS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=hf_tok.pad_token_id,
        initializer_range=0.1,
    )
    return _save(path, seed, lambda: Qwen3ForCausalLM(cfg), hf_tok)


def build_tiny_cross_encoder(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """A tiny random BertForSequenceClassification (one label) whose tokenizer joins a pair as
    `[CLS] query [SEP] document [SEP]` with token types 0 then 1, as bert-based rerankers do; kept if built."""
    from tokenizers import processors
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(directory)
    if (path / "tokenizer.json").exists() and (path / "config.json").exists():
        return path
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB_WORDS)]
    hf_tok = _word_level(
        words,
        "[UNK]",
        post_processor=processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        ),
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    cfg = BertConfig(
        vocab_size=len(words),
        **TINY_LAYERS,
        max_position_embeddings=512,
        num_labels=1,  # type: ignore[call-arg]  # a PretrainedConfig keyword BertConfig's stub does not list
        pad_token_id=0,
        initializer_range=0.3,  # spreads the scores over (0, 1)
    )
    return _save(path, seed, lambda: BertForSequenceClassification(cfg), hf_tok)
