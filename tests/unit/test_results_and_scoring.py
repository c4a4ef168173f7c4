"""Pure logic between the engine and the answer: prompts from a chunk and scores back to pairs (`workers.scoring`),
long documents cut into windows (`workers.prompts`), and results ranked and assembled (`store.results`)."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from schemas import keys
from schemas.chunks import Chunk, ChunkResult, PairOptions, Segment
from schemas.errors import JobNotFound
from schemas.jobs import RequestResults
from store import results
from store.codec import now_iso
from store.job_state import JobInput, JobRecord, RequestInput
from store.results import open_results, rank
from workers import scoring
from workers.models.qwen3_reranker import format_body
from workers.prompts import Pair

MAX_LENGTH = 256  # the `prompts` fixture builds at this length


def words(start: int, n: int) -> str:
    return " ".join(f"w{(start + i) % 500}" for i in range(n))


# --- ranking and assembly -------------------------------------------------------------------------------------


def test_rank_sorts_by_score_keeps_document_order_on_ties_and_cuts_to_top_n() -> None:
    ranked = rank([0.2, 0.9, 0.2, 0.5], None, None, None)
    assert [(r.index, r.relevance_score) for r in ranked] == [(1, 0.9), (3, 0.5), (0, 0.2), (2, 0.2)]
    assert [r.index for r in rank([0.2, 0.9, 0.2, 0.5], 2, None, None)] == [1, 3]
    assert [r.index for r in rank([0.2, 0.9], 0, None, None)] == [1, 0]  # 0: all
    assert all(r.document is None and r.id is None and r.window is None for r in ranked)


def test_rank_carries_texts_ids_and_winning_windows_of_the_right_documents() -> None:
    ranked = rank([0.1, 0.7], None, ["a", "b"], ["id-a", None], [None, [2, 5, 100, 160]])
    first, second = ranked
    assert (first.index, first.id, first.document and first.document.text) == (1, None, "b")
    assert first.window is not None
    assert (first.window.index, first.window.count, first.window.start_token, first.window.end_token) == (
        2,
        5,
        100,
        160,
    )
    assert (second.index, second.id, second.document and second.document.text, second.window) == (0, "id-a", "a", None)


def _meta(custom_id: str | None, n: int, top_n: int | None = None, echo: bool = False, ids=None) -> RequestInput:
    return RequestInput(custom_id=custom_id, top_n=top_n, n=n, echo=echo, ids=ids)


def _input(index: int, *segments: tuple[int, list[str]]) -> str:
    parts = [Segment(request=r, query="q", instruction=None, documents=docs) for r, docs in segments]
    return Chunk(job_id="job_x", index=index, priority=5, segments=parts).model_dump_json()


def _stored_job(requests: list[RequestInput], scores: dict[int, ChunkResult], inputs: dict[int, str] | None = None):
    """A succeeded job's record, input summary, chunk results and chunk inputs in a (fake) Redis."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    record = JobRecord(id="job_x", priority=5, created_at=now_iso(), total=0, chunks_total=len(scores),
                       request_count=len(requests), status="succeeded")  # fmt: skip
    client.set(keys.job_input_key("job_x"), JobInput(requests=requests).model_dump_json())
    client.hset(keys.job_scores_key("job_x"), mapping={i: c.model_dump_json() for i, c in scores.items()})
    if inputs:
        client.hset(keys.job_chunks_key("job_x"), mapping=inputs)
    return client, record


def read_results(client: fakeredis.FakeRedis, record: JobRecord) -> list[RequestResults]:
    """Every result of the job, read as the API reads them (`open_results`, asyncio) from the same fake server."""

    async def read() -> list[RequestResults]:
        aclient = fakeredis.aioredis.FakeRedis(server=client.connection_pool.connection_kwargs["server"])
        return [entry async for entry in await open_results(aclient, record)]

    return asyncio.run(read())


def test_results_join_chunks_in_index_order_and_split_them_per_request(monkeypatch) -> None:
    """The first request's pairs straddle two chunks (read one chunk per round trip here); its texts come from the
    chunks' inputs, the second request (which does not echo documents) gets none."""
    monkeypatch.setattr(results, "READ_CHUNKS", 1)
    client, record = _stored_job(
        [_meta("q1", 3, top_n=2, echo=True), _meta("q2", 2)],
        {1: ChunkResult(scores=[0.5, 0.4, 0.8]), 0: ChunkResult(scores=[0.1, 0.9])},  # stored out of order
        {1: _input(1, (0, ["c"]), (1, ["d", "e"])), 0: _input(0, (0, ["a", "b"]))},
    )
    q1, q2 = read_results(client, record)
    assert q1.custom_id == "q1" and [(r.index, r.relevance_score) for r in q1.results] == [(1, 0.9), (2, 0.5)]
    assert [r.document.text for r in q1.results if r.document] == ["b", "c"]
    assert q2.custom_id == "q2" and [(r.index, r.relevance_score) for r in q2.results] == [(1, 0.8), (0, 0.4)]
    assert all(r.document is None for r in q2.results)


def test_results_echo_document_ids_and_windows() -> None:
    windows = [[0, 1, 0, 5], [1, 3, 40, 90]]
    client, record = _stored_job(
        [_meta(None, 2, ids=["d0", None])], {0: ChunkResult(scores=[0.2, 0.4], windows=windows)}
    )
    [entry] = read_results(client, record)
    assert [(r.index, r.id) for r in entry.results] == [(1, None), (0, "d0")]
    assert [(r.index, r.window.index if r.window else None) for r in entry.results] == [(1, 1), (0, 0)]


def test_an_expired_jobs_results_hold_what_was_scored() -> None:
    """Chunks of 2 pairs; chunk 1 was never scored (the job expired): its documents are left out of their requests,
    the rest ranked as usual, texts echoed where asked. Read in full, the same job fails as the job expired does."""
    client, record = _stored_job(
        [_meta("q1", 3, echo=True), _meta("q2", 3)],
        {0: ChunkResult(scores=[0.1, 0.9]), 2: ChunkResult(scores=[0.3, 0.7])},
        {0: _input(0, (0, ["a", "b"])), 2: _input(2, (1, ["e", "f"]))},
    )
    record.chunks_total, record.chunk_size, record.total = 3, 2, 6

    async def read(partial: bool) -> list[RequestResults]:
        aclient = fakeredis.aioredis.FakeRedis(server=client.connection_pool.connection_kwargs["server"])
        return [entry async for entry in await open_results(aclient, record, partial=partial)]

    q1, q2 = asyncio.run(read(partial=True))
    assert [(r.index, r.relevance_score, r.document.text if r.document else None) for r in q1.results] == [
        (1, 0.9, "b"),
        (0, 0.1, "a"),
    ]
    assert [(r.index, r.relevance_score) for r in q2.results] == [(2, 0.7), (1, 0.3)]
    with pytest.raises(JobNotFound):
        asyncio.run(read(partial=False))


def test_results_that_expired_raise_job_not_found() -> None:
    client, record = _stored_job([_meta(None, 2)], {0: ChunkResult(scores=[0.2, 0.4])})
    client.delete(keys.job_scores_key("job_x"))
    with pytest.raises(JobNotFound):
        read_results(client, record)
    client.delete(keys.job_input_key("job_x"))
    with pytest.raises(JobNotFound):
        read_results(client, record)

    async def read_async() -> list[RequestResults]:
        aclient = fakeredis.aioredis.FakeRedis()
        await aclient.set(keys.job_input_key("job_x"), JobInput(requests=[_meta("a", 2)]).model_dump_json())
        await aclient.hset(keys.job_scores_key("job_x"), 0, ChunkResult(scores=[0.2, 0.4]).model_dump_json())
        found = [entry async for entry in await open_results(aclient, record)]
        await aclient.delete(keys.job_input_key("job_x"))
        with pytest.raises(JobNotFound):  # before any result is streamed
            await open_results(aclient, record)
        return found

    [entry] = asyncio.run(read_async())
    assert entry.custom_id == "a" and [r.index for r in entry.results] == [1, 0]


# --- windows and cuts -----------------------------------------------------------------------------------------


def test_a_document_that_fits_is_one_window_scored_exactly_as_in_truncate_mode(prompts) -> None:
    pair = Pair("w1", words(10, 20))
    [window] = prompts.windows(pair, PairOptions(windows=True))
    assert (window.start, window.end) == (0, 20)
    assert window.token_ids == prompts.encode([pair])[0]


def test_long_documents_are_split_into_overlapping_windows_that_cover_it(prompts) -> None:
    doc = words(0, 230)
    options = PairOptions(windows=True, window_tokens=60, window_overlap=10)
    windows = prompts.windows(Pair("w5 w6", doc, "Find w7"), options)
    assert [(w.start, w.end) for w in windows] == [(0, 60), (50, 110), (100, 160), (150, 210), (200, 230)]
    for w in windows:
        assert w.token_ids == prompts.encode([Pair("w5 w6", words(w.start, w.end - w.start), "Find w7")])[0]
        assert w.token_ids[-len(prompts.suffix_ids) :] == prompts.suffix_ids
    # A last window that ends exactly at the document's end is the last one: no window inside the previous one.
    exact = prompts.windows(Pair("w5 w6", words(0, 110)), options)
    assert [(w.start, w.end) for w in exact] == [(0, 60), (50, 110)]


def test_max_doc_tokens_cuts_the_document_before_it_is_windowed(prompts) -> None:
    options = PairOptions(windows=True, window_tokens=60, window_overlap=10, max_doc_tokens=100)
    windows = prompts.windows(Pair("w5", words(0, 230)), options)
    assert [(w.start, w.end) for w in windows] == [(0, 60), (50, 100)]
    [short] = prompts.windows(Pair("w5", words(0, 5)), options.model_copy(update={"max_doc_tokens": 3}))
    assert (short.start, short.end) == (0, 3) and short.token_ids == prompts.encode([Pair("w5", words(0, 3))])[0]


def test_the_largest_overlap_moves_windows_one_token_at_a_time(prompts) -> None:
    windows = prompts.windows(Pair("w1", words(0, 20)), PairOptions(windows=True, window_tokens=16, window_overlap=15))
    assert [(w.start, w.end) for w in windows] == [(k, k + 16) for k in range(5)]


def test_a_query_that_fills_the_prompt_leaves_no_room_for_a_window(prompts) -> None:
    from schemas.errors import InvalidInput

    template = len(prompts.tokenizer(format_body("", ""), add_special_tokens=False).input_ids)
    free = prompts.body_budget - template  # query words plus document words that fit in a prompt
    with pytest.raises(InvalidInput, match=r"^the query and instruction leave no room for a document window$"):
        prompts.windows(Pair(words(0, free - 7), words(0, 300)), PairOptions(windows=True))  # 7 left
    fits = prompts.windows(Pair(words(0, free - 8), words(0, 300)), PairOptions(windows=True))  # 8 left: enough
    assert fits and {w.end - w.start for w in fits[:-1]} == {8}


def test_windows_default_to_as_many_tokens_as_fit_and_never_exceed_the_max_length(prompts) -> None:
    windows = prompts.windows(Pair("w1", words(0, 600)), PairOptions(windows=True, window_overlap=0))
    assert len(windows) > 2
    assert all(len(w.token_ids) <= prompts.max_length for w in windows)
    assert max(len(w.token_ids) for w in windows) == prompts.max_length  # full windows use the whole budget
    assert windows[0].end == windows[1].start and windows[-1].end == 600


def test_max_doc_tokens_cuts_each_document_first(prompts) -> None:
    cut = prompts.encode([Pair("w1", words(0, 50))], PairOptions(max_doc_tokens=12))[0]
    assert cut == prompts.encode([Pair("w1", words(0, 12))])[0]
    short = prompts.encode([Pair("w1", words(0, 5))], PairOptions(max_doc_tokens=12))[0]
    assert short == prompts.encode([Pair("w1", words(0, 5))])[0]


def test_a_prompt_limit_cuts_the_whole_prompt_and_refuses_one_with_no_room(prompts) -> None:
    from schemas.errors import InvalidInput

    limited = prompts.encode([Pair("w1", words(0, 200))], PairOptions(max_prompt_tokens=100))[0]
    assert len(limited) == 100
    with pytest.raises(InvalidInput, match="leaves no room"):
        prompts.encode([Pair("w1", "w2")], PairOptions(max_prompt_tokens=len(prompts.prefix_ids) + 10))
    with pytest.raises(InvalidInput, match="truncation is off"):
        prompts.encode([Pair("w1", words(0, 400))], PairOptions(truncate=False))


# --- from a chunk to prompts and back ----------------------------------------------------------------------------


def test_prepare_encodes_every_segment_in_order_and_aggregate_gives_one_score_per_pair(prompts) -> None:
    chunk = Chunk(
        job_id="job_x",
        index=0,
        priority=5,
        segments=[
            Segment(request=0, query="w1", instruction=None, documents=[words(0, 5), words(5, 5)]),
            Segment(request=1, query="w2", instruction="Find w3", documents=[words(9, 4)]),
        ],
    )
    prepared = scoring.prepare(prompts, chunk)
    assert prepared.pairs == 3 and not prepared.windowed
    assert prepared.prompts == prompts.encode(
        [Pair("w1", words(0, 5)), Pair("w1", words(5, 5)), Pair("w2", words(9, 4), "Find w3")]
    )
    assert prepared.owners == [0, 1, 2] and prepared.spans == [None, None, None]
    result = scoring.aggregate(prepared, [0.3, 0.6, 0.9])
    assert result.scores == [0.3, 0.6, 0.9] and result.windows is None
    assert result.tokens == sum(len(p) for p in prepared.prompts)
    with pytest.raises(ValueError):  # a score per prompt, or the engine's answer is not this chunk's
        scoring.aggregate(prepared, [0.3, 0.6])


def test_prepare_applies_each_segments_options(prompts) -> None:
    options = PairOptions(max_doc_tokens=3)
    chunk = Chunk(
        job_id="job_x",
        index=0,
        priority=5,
        segments=[Segment(request=0, query="w1", instruction=None, documents=[words(0, 9)], options=options)],
    )
    assert scoring.prepare(prompts, chunk).prompts == [prompts.encode([Pair("w1", words(0, 3))])[0]]


def test_in_windows_mode_a_pair_scores_its_best_window_and_says_which(prompts) -> None:
    options = PairOptions(windows=True, window_tokens=60, window_overlap=10)
    chunk = Chunk(
        job_id="job_x",
        index=0,
        priority=5,
        segments=[
            Segment(request=0, query="w5", instruction=None, documents=[words(0, 230), "w1 w2"], options=options)
        ],
    )
    prepared = scoring.prepare(prompts, chunk)
    assert prepared.windowed and prepared.pairs == 2
    assert prepared.owners == [0, 0, 0, 0, 0, 1]
    assert prepared.spans == [
        [0, 5, 0, 60],
        [1, 5, 50, 110],
        [2, 5, 100, 160],
        [3, 5, 150, 210],
        [4, 5, 200, 230],
        [0, 1, 0, 2],
    ]
    result = scoring.aggregate(prepared, [0.2, 0.7, 0.1, 0.7, 0.3, 0.05])
    assert result.scores == [0.7, 0.05]
    assert result.windows == [[1, 5, 50, 110], [0, 1, 0, 2]]  # the first of two equal best windows wins
