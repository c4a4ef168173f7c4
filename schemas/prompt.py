"""The Qwen3-Reranker prompt, exactly as the model card (QwenLM/Qwen3-Embedding) builds it."""

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_body(query: str, document: str, instruction: str | None = None) -> str:
    """The user turn between PREFIX and SUFFIX; truncation cuts this text from its end."""
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
