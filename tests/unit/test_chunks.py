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
