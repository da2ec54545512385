"""Chunk sizes: fixed, or adapted to measured iteration cost (pure, no processes)."""

from __future__ import annotations

from autopar._chunking import CHUNK_BYTES, KNOWN_LENGTH_TARGET, MAX_CHUNK, UNKNOWN_LENGTH_TARGET, ChunkSizer


def test_fixed_size_never_changes() -> None:
    sizer = ChunkSizer(5, workers=2, total=1000)
    sizer.record(5, 100.0)
    assert [sizer.next_size() for _ in range(3)] == [5, 5, 5]


def test_starts_with_one_and_grows_for_cheap_iterations() -> None:
    sizer = ChunkSizer(None, workers=2, target_seconds=0.02, growth=8)
    assert sizer.next_size() == 1
    sizer.record(1, 5e-6)
    assert sizer.next_size() == 8
    for _ in range(6):
        sizer.record(sizer.size, sizer.size * 5e-6)
    assert sizer.next_size() == round(0.02 / 5e-6)


def test_expensive_iterations_stay_one_per_chunk() -> None:
    sizer = ChunkSizer(None, workers=2)
    sizer.next_size()
    sizer.record(1, 0.5)
    assert sizer.next_size() == 1


def test_known_length_keeps_the_tail_spread_over_workers() -> None:
    """With 100 iterations left and 2 workers, no chunk takes more than 100 / (2 x 4)."""
    sizer = ChunkSizer(None, workers=2, total=100, chunks_per_worker=4, target_seconds=0.04)
    sizer.record(1, 1e-3)  # 1 ms iterations: 40 per chunk by cost
    assert sizer.size == 8
    sizer.record(8, 8e-3)
    assert sizer.size == 40
    assert sizer.next_size() == 13


def test_the_tail_does_not_shrink_below_tail_seconds_of_work() -> None:
    """Cheap iterations: the last chunks stay big enough to be worth a round trip, until
    what is left is less than a floor-sized chunk per worker."""
    sizer = ChunkSizer(None, workers=2, total=100_000, target_seconds=0.02, tail_seconds=0.005)
    for _ in range(5):
        sizer.record(1000, 5e-3)  # 5 us iterations: about 4,000 per chunk by cost
    assert 3990 <= sizer.size <= 4000
    sizes = []
    while sizer._handed_out < 100_000:
        remaining = 100_000 - sizer._handed_out
        sizes.append(sizer.next_size())
        if remaining >= 2 * 1000:
            assert sizes[-1] >= 990
    assert len(sizes) < 50


def test_automatic_chunks_never_exceed_the_cap() -> None:
    sizer = ChunkSizer(None, workers=2)
    sizes = []
    for _ in range(10):
        sizes.append(sizer.next_size())
        sizer.record(sizes[-1], sizes[-1] * 1e-7)
    assert max(sizes) == sizes[-1] == MAX_CHUNK


def test_chunks_grow_from_what_was_measured_not_from_how_often() -> None:
    """Cheap one-iteration probes coming back one after another must not compound into a
    huge chunk: the first iterations of a loop are not always like the rest."""
    sizer = ChunkSizer(None, workers=4)
    window = [sizer.next_size() for _ in range(8)]
    for size in window[:5]:
        sizer.record(size, 1e-6)
    assert sizer.next_size() == sizer.growth
    sizer.record(sizer.growth, sizer.growth * 1e-6)
    assert sizer.next_size() == sizer.growth**2


def test_chunks_of_big_arguments_stay_under_the_byte_budget() -> None:
    """1 MB per iteration: a chunk carries at most CHUNK_BYTES of arguments."""
    sizer = ChunkSizer(None, workers=2)
    for _ in range(6):
        sizer.record(sizer.size, sizer.size * 1e-5, nbytes=sizer.size * 1_000_000)
    assert sizer.size == CHUNK_BYTES // 1_000_000


def test_chunks_are_longer_when_the_tail_can_shrink() -> None:
    """A known length lets the last chunks shrink, so the others may be longer (fewer round
    trips); without one, the last chunk cannot shrink and all chunks stay short."""
    known, unknown = ChunkSizer(None, workers=2, total=1000), ChunkSizer(None, workers=2)
    for sizer in (known, unknown):
        for _ in range(4):
            sizer.record(sizer.size, sizer.size * 0.005)  # 5 ms iterations
    known_size, unknown_size = known.next_size(), unknown.next_size()
    assert abs(known_size - KNOWN_LENGTH_TARGET / 0.005) <= 1
    assert abs(unknown_size - UNKNOWN_LENGTH_TARGET / 0.005) <= 1
    assert known_size > unknown_size


def test_iterations_getting_dearer_shrink_chunks_at_once() -> None:
    """Input sorted cheapest first: one dear chunk sizes the next by its own cost, not by the
    loop's mean, which still remembers the cheap start."""
    sizer = ChunkSizer(None, workers=2, total=10_000, target_seconds=0.05)
    for _ in range(4):
        sizer.record(sizer.size, sizer.size * 0.001)  # 1 ms iterations: chunks of 50
    assert sizer.size == 50
    sizer.record(50, 50 * 0.01)  # now 10 ms each; the loop's mean is still ~2.6 ms
    assert sizer.size == 5


def test_a_known_length_loop_takes_few_round_trips_and_ends_on_small_chunks() -> None:
    """64 x 25 ms on 2 workers: after one-iteration probes, each chunk takes at most a
    quarter of what is left (guided self-scheduling), so a dozen chunks or so carry the loop,
    and the last ones hold one iteration each, spreading the end over both workers."""
    total, cost = 64, 0.025
    sizer = ChunkSizer(None, workers=2, total=total)
    sizes: list[int] = []
    handed_out = 0
    while handed_out < total:
        size = min(sizer.next_size(), total - handed_out)
        remaining = total - handed_out
        if sizes:  # not the probes: bounded by the share of what is left
            assert size <= max(1, -(-remaining // 4))
        sizes.append(size)
        handed_out += size
        sizer.record(size, size * cost)
    assert sizes[0] == 1
    assert len(sizes) <= 18  # a 50 ms target alone would take 32
    assert sizes[-2:] == [1, 1]


def test_the_tail_floor_never_gives_a_worker_more_than_its_share_of_what_is_left() -> None:
    """Cheap first iterations price the floor (5 ms of work) at hundreds of iterations; when
    the rest turn out dear, a floor-sized chunk must still leave the other workers their share."""
    sizer = ChunkSizer(None, workers=8, total=300, tail_seconds=0.005)
    handed_out = 0
    for _ in range(4):
        size = sizer.next_size()
        handed_out += size
        sizer.record(size, size * 1e-4)  # 0.1 ms each: the floor is 50 iterations
    remaining = 300 - handed_out
    assert sizer.next_size() <= -(-remaining // 8)
