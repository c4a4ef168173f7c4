"""The contract shared by the API and the workers: settings, request/response models, chunk messages, Redis keys,
errors and metric definitions. Nothing here has a thread or a socket, or imports torch, vLLM or Celery."""
