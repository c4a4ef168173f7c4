from schemas.chunks import chunk_count, split_into_chunks
from schemas.jobs import RerankRequest


def _requests(sizes: list[int]) -> list[RerankRequest]:
    return [RerankRequest(query=f"q{r}", documents=[f"d{r}.{i}" for i in range(n)]) for r, n in enumerate(sizes)]


def test_chunks_cover_every_pair_once_in_order() -> None:
    requests = _requests([5, 1, 7, 3])
    chunks = list(split_into_chunks("job_x", requests, chunk_size=4, priority=5))
    flat = [(s.request, d) for c in chunks for s in c.segments for d in s.documents]
    assert flat == [(r, f"d{r}.{i}") for r, n in enumerate([5, 1, 7, 3]) for i in range(n)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.size for c in chunks] == [4, 4, 4, 4]
    assert len(chunks) == chunk_count(16, 4)


def test_last_chunk_is_partial_and_segments_keep_query_and_instruction() -> None:
    requests = [RerankRequest(query="a", documents=["x", "y", "z"], instruction="find it")]
    chunks = list(split_into_chunks("job_x", requests, chunk_size=2, priority=1))
    assert [c.size for c in chunks] == [2, 1]
    assert all(s.instruction == "find it" and s.query == "a" for c in chunks for s in c.segments)
    assert chunk_count(3, 2) == 2


def test_chunks_carry_the_job_tenant_priority_and_each_requests_options() -> None:
    from schemas.chunks import PairOptions

    plain = RerankRequest(query="a", documents=["x", "y", "z"])
    windowed = RerankRequest(
        query="b", documents=["u", "v"], long_documents="windows", window_tokens=40, window_overlap=8
    )
    chunks = list(split_into_chunks("job_x", [plain, windowed], 4, 7, max_prompt_tokens=300, tenant="acme"))
    assert [(c.job_id, c.tenant, c.priority) for c in chunks] == [("job_x", "acme", 7)] * 2
    first, second = chunks[0].segments
    assert (first.request, first.documents, second.request, second.documents) == (0, ["x", "y", "z"], 1, ["u"])
    assert first.options == PairOptions(max_prompt_tokens=300)
    assert second.options == PairOptions(max_prompt_tokens=300, windows=True, window_tokens=40, window_overlap=8)
    assert chunks[1].segments[0].documents == ["v"] and chunks[1].segments[0].query == "b"
    assert chunks[1].index == 1 and chunks[1].size == 1


def test_pair_options_follow_the_request_and_are_none_when_all_default() -> None:
    from schemas.chunks import PairOptions

    assert PairOptions.of(RerankRequest(query="a", documents=["x"])) is None
    options = PairOptions.of(
        RerankRequest(query="a", documents=["x"], max_tokens_per_doc=30, truncate=False), max_prompt_tokens=200
    )
    assert options == PairOptions(max_doc_tokens=30, max_prompt_tokens=200, truncate=False)
    assert PairOptions.of(RerankRequest(query="a", documents=["x"], window_overlap=3)) == PairOptions(window_overlap=3)


def test_a_request_of_exactly_one_chunk_makes_one_chunk() -> None:
    chunks = list(split_into_chunks("job_x", _requests([4]), chunk_size=4, priority=0))
    assert chunks[0].tenant == "default"  # jobs of a farm without API keys
    assert len(chunks) == 1 and chunks[0].size == 4 and chunk_count(4, 4) == 1 and chunk_count(5, 4) == 2
