"""Scoring engines: `base` (the protocol every engine meets), `factory` (which one a worker loads), and one module
per engine. Importing this package loads no model and imports neither torch nor vLLM."""
