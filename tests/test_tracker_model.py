"""The slow twin checks the fast one: the C dirty bitmap against a few-line
pure-Python model (a set of dirty granule numbers, the image size and the
granularity), driven by hypothesis through random operation sequences."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import given, note, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from blockmirror import TrackedImage, Tracker
from blockmirror._bindings import tracker as _tracker_c
from blockmirror._bindings._ffi import SCAN_DONE, ffi, lib

# -- the model --------------------------------------------------------------------


class BitmapModel:
    """What the dirty bitmap means, in the plainest Python."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.g = granularity
        self.dirty: set[int] = set()
        self.generation = 0

    def granules(self, size: int | None = None) -> int:
        size = self.size if size is None else size
        return -(-size // self.g)

    def span(self, offset: int, length: int) -> range:
        return range(offset // self.g, (offset + length - 1) // self.g + 1)

    def mark(self, offset: int, length: int) -> None:
        if length == 0:
            return
        if offset + length > self.size:
            raise OSError(errno.EINVAL, "past the end")
        self.dirty.update(self.span(offset, length))

    def mark_all(self) -> None:
        self.dirty.update(range(self.granules()))

    def resize(self, new: int) -> None:
        old = self.size
        self.size = new
        if new > old:
            self.dirty.update(range(old // self.g, self.granules(new)))
        elif new < old:
            limit = self.granules(new)
            self.dirty = {g for g in self.dirty if g < limit}
            if new > 0:
                self.dirty.add((new - 1) // self.g)

    def extents(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for g in sorted(self.dirty):
            off = g * self.g
            end = min(off + self.g, self.size)
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((off, end - off))
        return out

    def dirty_bytes(self) -> int:
        return sum(min((g + 1) * self.g, self.size) - g * self.g for g in self.dirty)

    def fetch_and_clear(self) -> list[tuple[int, int]]:
        out = self.extents()
        self.dirty.clear()
        self.generation += 1
        return out


def extents_of(dirty, size, g):
    m = BitmapModel(size, g)
    m.dirty = set(dirty)
    return m.extents()


def check_extent_shape(extents, size, g):
    """Ascending, merged, granule-aligned, clipped to the image."""
    prev_end = -1
    for off, length in extents:
        assert length > 0
        assert off % g == 0
        assert off > prev_end, "extents must be ascending and never touch"
        end = off + length
        assert end <= size
        assert end % g == 0 or end == size
        prev_end = end


# -- the state machine -----------------------------------------------------------

GRANULARITIES = st.sampled_from([4096, 8192, 65536])
# mostly a few words of bitmap; sometimes past the first bitmap page (32768
# granules), so growth of the sidecar file is exercised too
GRANULE_COUNTS = st.one_of(
    st.integers(0, 300), st.integers(0, 300), st.integers(32000, 34000)
)


class TrackerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bm-model-")
        self.tracker: Tracker | None = None

    @initialize(
        granularity=GRANULARITIES,
        granules=st.integers(0, 300),
        extra=st.integers(0, 65535),
    )
    def setup(self, granularity, granules, extra):
        size = granules * granularity + extra % granularity
        img = os.path.join(self.dir, "disk.img")
        with open(img, "wb") as f:
            f.truncate(size)
        self.tracker = Tracker.create(img, granularity=granularity)
        self.model = BitmapModel(size, granularity)

    def teardown(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _range(self, data, allow_past_end: bool):
        size, g = self.model.size, self.model.g
        hi = size + 2 * g if allow_past_end else size
        offset = data.draw(
            st.one_of(
                st.integers(0, max(hi, 0)),
                # near a 64-granule word boundary
                st.integers(0, max(hi // (64 * g), 0)).map(lambda w: w * 64 * g)
                .flatmap(lambda b: st.integers(max(b - 2 * g, 0), b + g)),
            ),
            label="offset",
        )
        room = max(hi - offset, 0)
        if not allow_past_end:
            return offset, data.draw(
                st.one_of(st.integers(0, min(room, 2 * g)), st.integers(0, room)),
                label="length",
            )
        length = data.draw(
            st.one_of(
                st.just(0),
                st.integers(1, 2 * g),
                st.integers(0, room),
                st.integers(room, room + 3 * g),
            ),
            label="length",
        )
        return offset, length

    @rule(data=st.data())
    def mark(self, data):
        offset, length = self._range(data, allow_past_end=True)
        try:
            self.model.mark(offset, length)
        except OSError:
            with pytest.raises(OSError) as ei:
                self.tracker.mark(offset, length)
            assert ei.value.errno == errno.EINVAL
        else:
            self.tracker.mark(offset, length)

    @rule(data=st.data())
    def mark_inside(self, data):
        offset, length = self._range(data, allow_past_end=False)
        self.model.mark(offset, length)
        self.tracker.mark(offset, length)

    @rule()
    def mark_all(self):
        self.model.mark_all()
        self.tracker.mark_all()

    @rule()
    def fetch_and_clear(self):
        got = self.tracker.fetch_and_clear()
        check_extent_shape(got, self.model.size, self.model.g)
        assert got == self.model.fetch_and_clear()
        assert self.tracker.generation == self.model.generation

    @rule(chunk=st.integers(1, 4))
    def fetch_and_clear_chunked(self, chunk):
        got = _tracker_c.scan_extents(self.tracker._h, clear=True, chunk=chunk).tolist()
        assert [tuple(e) for e in got] == self.model.fetch_and_clear()
        assert self.tracker.generation == self.model.generation

    @rule()
    def snapshot(self):
        got = self.tracker.dirty_extents()
        check_extent_shape(got, self.model.size, self.model.g)
        assert got == self.model.extents()

    @rule(chunk=st.integers(1, 3))
    def snapshot_chunked(self, chunk):
        got = _tracker_c.scan_extents(self.tracker._h, clear=False, chunk=chunk).tolist()
        assert [tuple(e) for e in got] == self.model.extents()

    @rule(granules=GRANULE_COUNTS, extra=st.integers(0, 65535))
    def resize(self, granules, extra):
        new = granules * self.model.g + extra % self.model.g
        note(f"resize {self.model.size} -> {new}")
        self.model.resize(new)
        self.tracker.resize(new)

    @precondition(lambda self: self.model.size > 0)
    @rule(delta=st.integers(1, 3 * 65536))
    def shrink_a_little(self, delta):
        new = max(self.model.size - delta, 0)
        self.model.resize(new)
        self.tracker.resize(new)

    @invariant()
    def same_size_and_count(self):
        if self.tracker is None:
            return
        assert self.tracker.image_size == self.model.size
        assert self.tracker.dirty_bytes() == self.model.dirty_bytes()


TestTrackerModel = TrackerMachine.TestCase
TestTrackerModel.settings = settings(stateful_step_count=40)


# -- the writer against the model -------------------------------------------------


class WriterMachine(RuleBasedStateMachine):
    """TrackedImage's pwrite/discard/truncate: the data and the dirty set."""

    G = 4096

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bm-writer-")
        img = os.path.join(self.dir, "disk.img")
        size = 37 * self.G + 123
        with open(img, "wb") as f:
            f.truncate(size)
        self.image = TrackedImage(img, granularity=self.G)
        self.model = BitmapModel(size, self.G)
        self.data = bytearray(size)

    def teardown(self) -> None:
        self.image.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.data(), fill=st.binary(min_size=1, max_size=1))
    def pwrite(self, data, fill):
        size = self.model.size
        offset = data.draw(st.integers(0, size + 3 * self.G), label="offset")
        length = data.draw(st.integers(0, 3 * self.G), label="length")
        payload = fill * length
        assert self.image.pwrite(payload, offset) == length
        if length:
            end = offset + length
            if end > size:
                self.model.resize(end)  # grows first, marking the new range
                self.data.extend(bytes(end - size))
            self.model.mark(offset, length)
            self.data[offset:end] = payload

    @rule(data=st.data())
    def discard(self, data):
        size = self.model.size
        offset = data.draw(st.integers(0, size + self.G), label="offset")
        length = data.draw(st.integers(0, 2 * self.G), label="length")
        if length and offset + length > size:
            with pytest.raises(OSError) as ei:
                self.image.discard(offset, length)
            assert ei.value.errno == errno.EINVAL
            return
        self.image.discard(offset, length)
        self.model.mark(offset, length)
        self.data[offset : offset + length] = bytes(length)

    @rule(size=st.integers(0, 60 * 4096))
    def truncate(self, size):
        self.image.truncate(size)
        self.model.resize(size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    @rule()
    def fetch_and_clear(self):
        assert self.image.tracker.fetch_and_clear() == self.model.fetch_and_clear()

    @invariant()
    def matches(self):
        assert self.image.size == self.model.size == self.image.tracker.image_size
        assert self.image.tracker.dirty_extents() == self.model.extents()
        assert self.image.pread(len(self.data) + 10, 0) == bytes(self.data)


TestWriterModel = WriterMachine.TestCase
TestWriterModel.settings = settings(stateful_step_count=25)


# -- the chunked scan ------------------------------------------------------------------


def _tracker_with(tmp_path, granule_set, granules, g=4096):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(granules * g)
    t = Tracker.create(img, granularity=g)
    for gr in granule_set:
        t.mark(gr * g, 1)
    return t


@settings(max_examples=40)
@given(
    granule_set=st.sets(st.integers(0, 700), max_size=200),
    runs=st.lists(st.tuples(st.integers(0, 700), st.integers(1, 200)), max_size=5),
    chunk=st.integers(1, 8),
)
def test_chunked_scan_matches_big_chunk(tmp_path_factory, granule_set, runs, chunk):
    tmp = tmp_path_factory.mktemp("scan")
    granules = 900
    for start, n in runs:  # long runs that cross word boundaries
        granule_set |= set(range(start, min(start + n, granules)))
    with _tracker_with(tmp, granule_set, granules) as t:
        big = _tracker_c.scan_extents(t._h, clear=False).tolist()
        small = _tracker_c.scan_extents(t._h, clear=False, chunk=chunk).tolist()
        assert small == big
        assert [tuple(e) for e in big] == extents_of(granule_set, granules * 4096, 4096)
        taken = _tracker_c.scan_extents(t._h, clear=True, chunk=chunk).tolist()
        assert taken == big  # nothing lost, nothing invented
        assert t.dirty_bytes() == 0
        assert t.generation == 1  # one full scan, however many calls it took


def test_fetch_and_clear_puts_back_overflow(tmp_path):
    """One C call with room for one extent takes one extent and leaves the
    rest dirty, including the rest of a word it had to exchange whole."""
    g = 4096
    dirty = {1, 3, 5, 62, 63, 64, 65, 100, 200}
    with _tracker_with(tmp_path, dirty, 300, g) as t:
        cursor = ffi.new("uint64_t *", 0)
        out = ffi.new("bm_extent[1]")
        n = lib.bm_fetch_and_clear(t._h, cursor, out, 1)
        assert n == 1
        assert (out[0].offset, out[0].length) == (g, g)
        assert cursor[0] == 3  # resumes at the first run it could not return
        # granules 3 and 5 share the word that was exchanged; they are back
        assert t.dirty_extents() == extents_of(dirty - {1}, 300 * g, g)
        got = []
        while cursor[0] != SCAN_DONE:
            n = lib.bm_fetch_and_clear(t._h, cursor, out, 1)
            assert n >= 0
            got += [(out[i].offset, out[i].length) for i in range(n)]
        # the run 62..65 crosses a word boundary and still comes back whole
        assert got == [(3 * g, g), (5 * g, g), (62 * g, 4 * g), (100 * g, g), (200 * g, g)]
        assert t.dirty_bytes() == 0
        assert t.generation == 1


def test_fetch_and_clear_zero_room_is_einval(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark(0, 1)
        cursor = ffi.new("uint64_t *", 0)
        out = ffi.new("bm_extent[1]")
        assert lib.bm_fetch_and_clear(t._h, cursor, out, 0) == -1
        assert ffi.errno == errno.EINVAL
        assert t.dirty_bytes() == 65536
