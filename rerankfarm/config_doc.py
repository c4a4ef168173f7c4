"""docs/configuration.md, generated from the Settings class so that it cannot drift from the code:
`python -m rerankfarm.config_doc` writes it, and a test checks that the committed file is what this renders."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from schemas.settings import Settings

PATH = Path(__file__).parents[1] / "docs" / "configuration.md"

HEAD = """# Configuration

Every setting is an environment variable (or a line in `.env`), read by `schemas/settings.py`. This file is generated
from it: `python -m rerankfarm.config_doc` (a test fails when it is out of date).

| variable | default | meaning |
| --- | --- | --- |
"""

TAIL = """
Removed: `RERANK_VLLM_CALLS_IN_FLIGHT` and `RERANK_VLLM_QUEUED_PASSES`. They tuned hand-offs between the worker's own
batcher and vLLM; the batcher is gone from the vLLM path and vLLM's scheduler is the only one. How much the engine
keeps admitted into vLLM is a measured constant (`ADMIT_PASSES` in `workers/engines/vllm_engine.py`), not a setting
(a worker that still sets them is not refused: unknown settings are ignored). `RERANK_MAX_BATCH_TOKENS` and
`RERANK_BATCH_WINDOW` concern the transformers engine only; vLLM's pass size is
`RERANK_VLLM_MAX_NUM_BATCHED_TOKENS`.
"""


def render() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        meaning = re.sub(r"\s+", " ", field.description or "").replace("|", "\\|")
        rows.append(f"| `RERANK_{name.upper()}` | `{default}` | {meaning} |\n")
    return HEAD + "".join(rows) + TAIL


def main() -> int:
    PATH.write_text(render())
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
