"""The interactive rerank call, in the shape Cohere's, Jina's and vLLM's rerank endpoints accept and return."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import DocumentIn, LongDocuments, NonBlank, RankedResult, RerankRequest


class RerankCall(LongDocuments):
    # Client libraries send fields of their own (Cohere's rank_fields, vLLM's priority...): accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Accepted for compatibility; the farm serves its configured model.")
    query: NonBlank
    documents: list[NonBlank | DocumentIn] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0, description="Keep the n best documents; 0 or omitted: all.")
    return_documents: bool | None = Field(
        None, description="Include document texts; default true on /v1/rerank and /rerank, false on /v2/rerank."
    )
    instruction: NonBlank | None = Field(None, description="Qwen3-Reranker task instruction.")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="Cut each document to this many tokens (Cohere).")
    truncate_prompt_tokens: int | None = Field(None, ge=16, description="Cut each whole prompt to this many (vLLM).")
    truncation: bool | None = Field(None, description="false: a too long prompt is an error, not cut (Jina).")
    timeout: float | None = Field(
        None, ge=0.01, le=600, description="Seconds to wait before answering 504 with the job id (the job goes on)."
    )

    def as_request(self, return_documents: bool) -> RerankRequest:
        return RerankRequest(
            query=self.query,
            documents=self.documents,
            instruction=self.instruction,
            top_n=self.top_n or None,
            return_documents=return_documents,
            long_documents=self.long_documents,
            window_tokens=self.window_tokens,
            window_overlap=self.window_overlap,
            max_tokens_per_doc=self.max_tokens_per_doc,
            truncate=self.truncation is not False,
        )


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ApiVersion(BaseModel):
    version: str = "2"


class BilledUnits(BaseModel):
    search_units: int = 1


class TokenCounts(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class RerankMeta(BaseModel):
    api_version: ApiVersion = Field(default_factory=ApiVersion)
    billed_units: BilledUnits = Field(default_factory=BilledUnits)
    tokens: TokenCounts


class RerankResponse(BaseModel):
    id: str = Field(description="The job id; /v1/jobs/{id} serves it too.")
    model: str
    results: list[RankedResult]
    usage: RerankUsage = Field(description="vLLM / Jina style token counts.")
    meta: RerankMeta = Field(description="Cohere style metadata.")
