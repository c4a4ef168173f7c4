"""The reranker models a worker can hold: each module is one model family's card (its prompt, the tokens or logits
its score is read from, how vLLM loads it), used by both engines and by nothing else."""
