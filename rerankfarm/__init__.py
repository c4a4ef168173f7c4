"""rerank farm: bulk and interactive reranking with Qwen3-Reranker on GPU-pinned Celery workers."""

__version__ = "0.1.0"
