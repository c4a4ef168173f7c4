"""rerank farm: bulk and interactive reranking with Qwen3-Reranker on GPU-pinned Celery workers."""

from rerankfarm.client import AsyncRerankFarm, RerankFarm, RerankFarmError, verify_webhook

__all__ = ["AsyncRerankFarm", "RerankFarm", "RerankFarmError", "verify_webhook"]
__version__ = "0.1.0"
