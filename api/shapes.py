"""The interactive call in the shapes rerank clients send, and the answer each expects: one class per shape.

| shape | paths | told apart by |
|---|---|---|
| `RerankCall`: Cohere v1/v2, Jina, vLLM rerank, OpenAI-compatible generic | /v1/rerank, /v2/rerank, /rerank | default |
| `TeiRerank`: Hugging Face text-embeddings-inference | /rerank (and /v1/rerank) | `texts` in the body |
| `VoyageRerank`: Voyage AI | /v1/rerank (and /rerank) | `top_k` in the body, or the Voyage SDK's header |
| `ScoreCall`: vLLM score | /score, /v1/score | the path |

Every shape turns into the farm's own `RerankRequest`s (`requests()`), and renders an `Answer` (the finished job's
ranked results) back in its own shape (`render()`), from the few options it keeps (`render_options()`): the batch
layer stores those options per line and renders output lines with the same code. Errors have a shape too
(`error_payload`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from schemas.jobs import DocumentIn, LongDocuments, NonBlank, RankedResult, RequestResults, RerankRequest, Timings


class Shape(StrEnum):
    rerank = "rerank"
    tei = "tei"
    voyage = "voyage"
    score = "score"


VOYAGE_HEADER = "x-voyage-client-user-agent"  # sent by the voyageai SDK


def shape_of(path: str, body: object, headers: Any = None) -> Shape:
    """Which client shape a call to `path` with this JSON body is: the path for scores, then the body (`texts`:
    TEI, `top_k`: Voyage), then the Voyage SDK's header."""
    if path.rstrip("/").endswith("/score"):
        return Shape.score
    if isinstance(body, dict):
        if "texts" in body:
            return Shape.tei
        if "top_k" in body:
            return Shape.voyage
    if headers is not None and VOYAGE_HEADER in headers:
        return Shape.voyage
    return Shape.rerank


@dataclass
class Answer:
    """A finished call, as every shape renders it."""

    job_id: str
    model: str
    results: list[RequestResults]  # one entry per request of `requests()`, in order
    tokens: int
    timings: Timings | None = None


def raw_score(p: float) -> float:
    """The logit difference (yes - no) that P(yes) = sigmoid(yes - no) came from (TEI's `raw_scores`)."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p) - math.log1p(-p)


def _top(n: int | None, documents: int) -> int | None:
    """A client's top-n as the farm keeps it: more than there are documents means all (as Cohere and vLLM do)."""
    return min(n, documents) if n else None


def _side(value: str | None) -> Literal["left", "right"]:
    return "left" if (value or "").lower() == "left" else "right"


class ShapedCall(BaseModel):
    """What every call shape has: its `shape`, the `model` it names, fields of other clients ignored, and by default
    no prompt limit and no render options (shapes with either override them)."""

    shape: ClassVar[Shape]
    # Client libraries send fields of their own (vLLM's priority, Cohere's max_chunks_per_doc...): accepted, ignored.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None,
        description="A served model, or an alias of one; the farm's default if omitted (TEI's clients send none: a "
        "TEI server holds one model).",
    )

    @property
    def max_prompt_tokens(self) -> int | None:
        return None

    def render_options(self) -> dict[str, Any]:
        return {}


# --- Cohere, Jina, vLLM rerank, OpenAI-compatible generic -----------------------------------------------------------


class RerankCall(LongDocuments, ShapedCall):
    shape: ClassVar[Shape] = Shape.rerank

    query: NonBlank
    documents: list[NonBlank | dict[str, Any]] = Field(
        min_length=1, description="Strings, or objects: `{text, id?}`, or any fields named in `rank_fields`."
    )
    rank_fields: list[NonBlank] | None = Field(
        None, min_length=1, description="Cohere v1: object fields scored, as `field: value` lines; default `text`."
    )
    top_n: int | None = Field(None, ge=0, description="Keep the n best documents; 0 or omitted: all.")
    return_documents: bool | None = Field(
        None, description="Include document texts; default true on /v1/rerank and /rerank, false on /v2/rerank."
    )
    instruction: NonBlank | None = Field(None, description="Qwen3-Reranker task instruction.")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="Cut each document to this many tokens (Cohere).")
    truncate_prompt_tokens: int | None = Field(None, ge=16, description="Cut each whole prompt to this many (vLLM).")
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="vLLM: which end of a too long document is cut; default right (its end)."
    )
    truncation: bool | None = Field(None, description="false: a too long prompt is an error, not cut (Jina).")
    timeout: float | None = Field(
        None, ge=0.01, le=600, description="Seconds to wait before answering 504 with the job id (the job goes on)."
    )

    @model_validator(mode="after")
    def _documents_have_text(self) -> RerankCall:
        for n, doc in enumerate(self.documents):
            if isinstance(doc, dict):
                fields = self.rank_fields or ["text"]
                if not any(isinstance(doc.get(f), str) and doc[f].strip() for f in fields):
                    raise ValueError(f"documents[{n}] has no text in {', '.join(fields)}")
                if isinstance(doc.get("id"), str) and len(doc["id"]) > 256:
                    raise ValueError(f"documents[{n}].id is longer than 256 characters")
        return self

    def _document(self, doc: str | dict[str, Any]) -> str | DocumentIn:
        if isinstance(doc, str):
            return doc
        doc_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        if self.rank_fields:  # Cohere v1: the fields named, as YAML-like lines
            text = "\n".join(f"{f}: {doc[f]}" for f in self.rank_fields if doc.get(f) is not None)
        else:
            text = doc["text"]
        return DocumentIn(text=text, id=doc_id)

    @property
    def max_prompt_tokens(self) -> int | None:
        return self.truncate_prompt_tokens

    def requests(self, return_documents: bool = True) -> list[RerankRequest]:
        return [
            RerankRequest(
                query=self.query,
                documents=[self._document(d) for d in self.documents],
                instruction=self.instruction,
                top_n=_top(self.top_n, len(self.documents)),
                return_documents=return_documents if self.return_documents is None else self.return_documents,
                long_documents=self.long_documents,
                window_tokens=self.window_tokens,
                window_overlap=self.window_overlap,
                max_tokens_per_doc=self.max_tokens_per_doc,
                truncate=self.truncation is not False,
                truncation_side=_side(self.truncation_side),
            )
        ]

    @staticmethod
    def render(answer: Answer) -> RerankResponse:
        return RerankResponse(
            id=answer.job_id,
            model=answer.model,
            results=answer.results[0].results,
            usage=RerankUsage(prompt_tokens=answer.tokens, total_tokens=answer.tokens),
            meta=RerankMeta(tokens=TokenCounts(input_tokens=answer.tokens)),
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


# --- Hugging Face text-embeddings-inference --------------------------------------------------------------------------


class TeiRerank(ShapedCall):
    """TEI's `POST /rerank`: every text is scored and answered, best first, as a bare array."""

    shape: ClassVar[Shape] = Shape.tei

    query: NonBlank
    texts: list[NonBlank] = Field(min_length=1)
    truncate: bool | None = Field(
        None, description="false: a too long text is an error; default true (TEI servers run with auto-truncate)."
    )
    # Clients send null for what they leave to the server: null means the default throughout.
    truncation_direction: str | None = Field(None, description="`left` or `right` (any case): which end is cut.")
    raw_scores: bool | None = Field(None, description="The logit difference yes - no instead of P(yes).")
    return_text: bool | None = Field(None, description="Include each text in the answer.")

    @field_validator("truncation_direction")
    @classmethod
    def _direction(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in ("left", "right"):
            raise ValueError("truncation_direction is Left or Right")
        return v

    def requests(self, return_documents: bool = False) -> list[RerankRequest]:
        return [
            RerankRequest(
                query=self.query,
                documents=list(self.texts),
                return_documents=bool(self.return_text),
                truncate=self.truncate is not False,
                truncation_side=_side(self.truncation_direction),
            )
        ]

    def render_options(self) -> dict[str, Any]:
        return {"raw_scores": bool(self.raw_scores)}

    @staticmethod
    def render(answer: Answer, raw_scores: bool = False) -> list[TeiRank]:
        return [
            TeiRank(
                index=r.index,
                score=raw_score(r.relevance_score) if raw_scores else r.relevance_score,
                text=r.document.text if r.document is not None else None,
            )
            for r in answer.results[0].results
        ]


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TeiError(BaseModel):
    error: str
    error_type: str


TEI_ERROR_TYPES = {400: "Validation", 401: "Unauthorized", 413: "Validation", 422: "Validation", 429: "Overloaded"}


class TeiModelType(BaseModel):
    reranker: dict[str, Any] = Field(default_factory=lambda: {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})


class TeiInfo(BaseModel):
    """TEI's `GET /info` (Dify reads `model_type` to accept a reranker)."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: TeiModelType = Field(default_factory=TeiModelType)
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    auto_truncate: bool = True
    tokenization_workers: int = 1
    version: str


# --- Voyage AI --------------------------------------------------------------------------------------------------------


class VoyageRerank(ShapedCall):
    shape: ClassVar[Shape] = Shape.voyage

    query: NonBlank
    documents: list[NonBlank] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, description="Keep the k best documents; all when omitted.")
    return_documents: bool | None = None
    truncation: bool | None = Field(None, description="false: a too long prompt is an error, not cut.")

    def requests(self, return_documents: bool = False) -> list[RerankRequest]:
        return [
            RerankRequest(
                query=self.query,
                documents=list(self.documents),
                top_n=_top(self.top_k, len(self.documents)),
                return_documents=bool(self.return_documents),
                truncate=self.truncation is not False,
            )
        ]

    @staticmethod
    def render(answer: Answer) -> VoyageResponse:
        return VoyageResponse(
            data=[
                VoyageResult(
                    index=r.index,
                    relevance_score=r.relevance_score,
                    document=r.document.text if r.document is not None else None,
                )
                for r in answer.results[0].results
            ],
            model=answer.model,
            usage=VoyageUsage(total_tokens=answer.tokens),
        )


class VoyageResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = None


class VoyageUsage(BaseModel):
    total_tokens: int


class VoyageResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoyageResult]
    model: str
    usage: VoyageUsage


class VoyageError(BaseModel):
    detail: str


# --- vLLM score -------------------------------------------------------------------------------------------------------


class ScoreCall(ShapedCall):
    """vLLM's score call: one query against many documents, or queries and documents paired one to one. Scores come
    back in pair order."""

    shape: ClassVar[Shape] = Shape.score

    text_1: NonBlank | list[NonBlank] | None = Field(None, description="The query, or queries (vLLM's older names).")
    text_2: NonBlank | list[NonBlank] | None = Field(None, description="The document, or documents.")
    queries: NonBlank | list[NonBlank] | None = None
    documents: NonBlank | list[NonBlank] | None = None
    instruction: NonBlank | None = Field(None, description="Qwen3-Reranker task instruction.")
    truncate_prompt_tokens: int | None = Field(None, ge=16, description="Cut each whole prompt to this many.")

    @model_validator(mode="after")
    def _pairs(self) -> ScoreCall:
        left, right = self._sides()
        if not left or not right:
            raise ValueError("send text_1 and text_2 (or queries and documents), neither empty")
        if len(left) != 1 and len(left) != len(right):
            raise ValueError(
                f"{len(left)} queries and {len(right)} documents: send one query, or as many queries as documents"
            )
        return self

    def _sides(self) -> tuple[list[str], list[str]]:
        def listed(v: str | list[str] | None) -> list[str]:
            return [v] if isinstance(v, str) else list(v or [])

        return listed(self.text_1 if self.text_1 is not None else self.queries), listed(
            self.text_2 if self.text_2 is not None else self.documents
        )

    @property
    def max_prompt_tokens(self) -> int | None:
        return self.truncate_prompt_tokens

    def requests(self, return_documents: bool = False) -> list[RerankRequest]:
        queries, documents = self._sides()
        if len(queries) == 1:
            return [RerankRequest(query=queries[0], documents=documents, instruction=self.instruction)]
        return [
            RerankRequest(query=q, documents=[d], instruction=self.instruction)
            for q, d in zip(queries, documents, strict=True)
        ]

    @staticmethod
    def render(answer: Answer) -> ScoreResponse:
        scores: list[float] = []  # in document order: each ranked result back to its document's place
        for entry in answer.results:
            placed = [0.0] * len(entry.results)
            for r in entry.results:
                placed[r.index] = r.relevance_score
            scores += placed
        return ScoreResponse(
            id=f"score-{answer.job_id}",
            created=int(time.time()),
            model=answer.model,
            data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
            usage=RerankUsage(prompt_tokens=answer.tokens, total_tokens=answer.tokens),
        )


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: RerankUsage


# --- one body, several shapes -----------------------------------------------------------------------------------------

Call = RerankCall | TeiRerank | VoyageRerank | ScoreCall
CALLS: dict[Shape, type[Call]] = {
    Shape.rerank: RerankCall,
    Shape.tei: TeiRerank,
    Shape.voyage: VoyageRerank,
    Shape.score: ScoreCall,
}


def _body_shape(body: object) -> str:
    return shape_of("/rerank", body).value


SHAPE_TAGS = {shape.value for shape in Shape}  # pydantic locates a shaped body's errors under its shape's tag

RerankBody = Annotated[
    Annotated[RerankCall, Tag(Shape.rerank.value)]
    | Annotated[TeiRerank, Tag(Shape.tei.value)]
    | Annotated[VoyageRerank, Tag(Shape.voyage.value)],
    Discriminator(_body_shape),
]
"""The body of the rerank paths: the keys it holds decide its shape (`texts`: TEI, `top_k`: Voyage)."""


def render(shape: Shape, answer: Answer, options: dict[str, Any]) -> BaseModel | list[Any]:
    """A finished call in its shape's answer (the interactive routes and the batch output lines alike)."""
    renderer: Any = CALLS[shape].render
    out: BaseModel | list[Any] = renderer(answer, **options)
    return out


def error_payload(shape: Shape | None, status: int, code: str, message: str, **details: Any) -> dict[str, Any]:
    """An error as a client of `shape` reads it: TEI `{error, error_type}`, Voyage `{detail}`, the others (Cohere,
    Jina, vLLM, OpenAI) `{"error": {code, message, type}}`."""
    if shape is Shape.tei:
        return {"error": message, "error_type": TEI_ERROR_TYPES.get(status, "Backend")}
    if shape is Shape.voyage:
        return {"detail": message}
    return {"error": {"code": code, "message": message, "type": code, **details}}
