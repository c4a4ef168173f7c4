"""The contract shared by the API and the workers: settings, request/response models, chunk messages, Redis keys,
errors and the Qwen3-Reranker prompt. Nothing here imports torch, vLLM or Celery's worker machinery."""
