"""The pick index: what a strategy's fast path needs, kept up to date by events, never rebuilt per pick.

Theory of operation
-------------------
A strategy's ``select_node`` sees an immutable snapshot of every backend, so
a pick over ``n`` backends costs ``O(n)`` however little the rule looks at.
A strategy may also offer a *fast path* (:func:`core.strategies.fast_path`): a
:class:`Picker` that answers the same rule from structures kept up to date as
things happen. :class:`core.balancer_state.BalancerState` owns one
:class:`PickIndex` and tells it about every change it makes to a backend; the
index keeps:

* ``members``: the backends *available* for traffic (healthy, not ejected, a
  half-open ejector's probe slot free) as a plain list, in no particular
  order, each member knowing its position (``index_pos``). Joining appends,
  leaving swaps the last member into the hole: both ``O(1)``. A member moves
  in or out only when its availability changes.
* a heap of *re-check* times. Availability changes through the balancer's
  own calls (a check, a refusal, an answer, the permit a pick takes, a stall
  ejection, membership), with one exception: an OPEN ejector turns HALF_OPEN
  when its ejection time is over, by time alone. A member that leaves with an
  OPEN ejector is queued at that moment (:meth:`Member.recheck_at`); each
  pick first settles the re-checks that have fallen due (``O(log n)`` each,
  at most one per ejection).
* the picker's own structures: nothing for round robin, random and power of
  two choices (they index ``members`` directly), a :class:`Ranking` (a binary
  heap with lazy deletion) for the least-* strategies and weighted round
  robin. The picker hears :meth:`Picker.joined`, :meth:`Picker.left` and
  :meth:`Picker.moved` (in flight, weight or latency changed) and answers
  :meth:`Picker.pick`.

``exclude`` (a retry elsewhere) costs ``O(e)`` for the list pickers: the
excluded members are swapped to the tail of ``members`` and the picker
draws from the first ``n - e``; a ranking steps past them, ``O(e log n)``.

Time: the index keeps the latest ``now`` it was given, and availability is
judged as of it (a ``now`` that goes backwards counts as no time passing, as
everywhere in core). Calls without a ``now`` (a health check's result, a
weight) use it.
"""

from __future__ import annotations

import abc
import heapq
import random
from itertools import count
from typing import Any, Generic, Iterator, Protocol, TypeVar

from core.latency import PeakEwma

__all__ = ["GONE", "OUT", "Member", "PickIndex", "Picker", "RankedPicker", "Ranking"]

#: ``index_pos`` of a member in the books but not available.
OUT = -1
#: ``index_pos`` of a member not (or no longer) in the books: events about it are ignored.
GONE = -2


class Member(Protocol):
    """What the index and the pickers read of a backend (:class:`core.balancer_state.BackendEntry`).

    ``index_pos`` and ``index_due`` belong to the index (its position in ``members``, or
    :data:`OUT` / :data:`GONE`; the re-check it has queued)."""

    id: str
    active: int
    latency: PeakEwma
    index_pos: int
    index_due: float | None

    @property
    def weight(self) -> int: ...

    def available(self, now: float) -> bool: ...

    def recheck_at(self) -> float | None: ...


M = TypeVar("M", bound=Member)


class Ranking:
    """Members ordered by a key, lowest first; equal keys first come, first served.

    A binary heap of ``[key, seq, member]`` items with lazy deletion: a member
    whose key changes gets a new item and its old one is marked dead (member
    None) and thrown away when it reaches the top, or when dead items outnumber
    the live ones (then the heap is rebuilt, ``O(n)``, amortised ``O(1)``).
    ``seq`` comes from a counter shared by the rankings of one picker, so a
    member whose key was set longest ago is first among equals: ties are taken
    in turn. Putting a member at the key it already has keeps its place.
    """

    __slots__ = ("_heap", "items", "_seq")

    def __init__(self, seq: Iterator[int] | None = None) -> None:
        self._heap: list[list[Any]] = []
        #: member -> its live item
        self.items: dict[Member, list[Any]] = {}
        self._seq = seq if seq is not None else count()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, member: Member, key: Any) -> None:
        """Rank ``member`` at ``key`` (``O(log n)``; nothing when the key is unchanged)."""
        old = self.items.get(member)
        if old is not None:
            if old[0] == key:
                return
            old[2] = None
        item = [key, next(self._seq), member]
        self.items[member] = item
        heap = self._heap
        heapq.heappush(heap, item)
        if len(heap) > 2 * len(self.items) + 32:
            self._heap = [i for i in heap if i[2] is not None]
            heapq.heapify(self._heap)

    def drop(self, member: Member) -> None:
        """``member`` is no longer ranked (unknown members are fine)."""
        item = self.items.pop(member, None)
        if item is not None:
            item[2] = None

    def reset(self, keyed: list[tuple[Any, Member]]) -> None:
        """Rank exactly these ``(key, member)``, equal keys in the order given (``O(n)``)."""
        self.items = {m: [key, next(self._seq), m] for key, m in keyed}
        self._heap = list(self.items.values())
        heapq.heapify(self._heap)

    def first(self, excluded: tuple[Member, ...] = ()) -> list[Any] | None:
        """The lowest ``[key, seq, member]`` whose member is not in ``excluded``; None if there is none.

        The item stays ranked. Stepping past excluded members takes them off
        the heap and puts them back: ``O(e log n)``."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        if not heap:
            return None
        top = heap[0]
        if not excluded or top[2] not in excluded:
            return top
        held, found = [], None
        while heap:
            item = heapq.heappop(heap)
            if item[2] is None:
                continue
            held.append(item)
            if item[2] not in excluded:
                found = item
                break
        for item in held:
            heapq.heappush(heap, item)
        return found


class Picker(abc.ABC):
    """A strategy's fast path: its rule over the available members, told of every change.

    Built with the strategy (for its seeded ``rng``); the hooks run after the
    index has updated ``members``. ``pick`` chooses among ``members[:n]``
    (the excluded ones are at the tail, and also given as ``excluded``) and
    updates the picker's own state as ``select_node`` would (a cursor, a
    schedule); ``n`` is at least 1.
    """

    def __init__(self, strategy: Any) -> None:
        self.rng: random.Random = strategy.rng

    def joined(self, member: Member, members: list[Any]) -> None:
        """``member`` became available (it is in ``members`` now)."""

    def left(self, member: Member, members: list[Any]) -> None:
        """``member`` is no longer available (it is out of ``members`` now)."""

    def moved(self, member: Member) -> None:
        """An available ``member``'s requests in flight, weight or latency may have changed."""

    @abc.abstractmethod
    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        """One of ``members[:n]``, by the strategy's rule."""


class RankedPicker(Picker):
    """The member with the lowest :meth:`key`, ties in turn: the least-* rules, ``O(log n)``.

    A subclass says what the key is; keys compare exactly as the strategy's
    ``select_node`` compares backends."""

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        self.ranking = Ranking()

    @staticmethod
    @abc.abstractmethod
    def key(member: Member) -> Any:
        """The member's rank; lower is picked first."""

    def joined(self, member: Member, members: list[Any]) -> None:
        self.ranking.put(member, self.key(member))

    def left(self, member: Member, members: list[Any]) -> None:
        self.ranking.drop(member)

    def moved(self, member: Member) -> None:
        self.ranking.put(member, self.key(member))

    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        item = self.ranking.first(excluded)
        assert item is not None, "a ranked picker ranks every available member"
        member: Member = item[2]
        return member


class PickIndex(Generic[M]):
    """The available members, the re-checks due, and the picker; see the module docstring."""

    __slots__ = ("picker", "members", "_due", "_now", "_seq")

    def __init__(self, picker: Picker) -> None:
        self.picker = picker
        self.members: list[M] = []
        self._due: list[tuple[float, int, M]] = []
        self._now = float("-inf")
        self._seq = count()

    # -- membership of the books ------------------------------------------------
    def enter(self, member: M) -> None:
        """``member`` joins the books (available or not, as it says)."""
        member.index_pos = OUT
        member.index_due = None
        self.refresh(member)

    def exit(self, member: M) -> None:
        """``member`` leaves the books; later events about it are ignored."""
        if member.index_pos >= 0:
            self._leave(member)
        member.index_pos = GONE

    # -- events -------------------------------------------------------------------
    def refresh(self, member: M, now: float | None = None) -> None:
        """Something about ``member`` changed (at ``now``): move it in or out, tell the picker."""
        pos = member.index_pos
        if pos == GONE:
            return
        if now is not None and now > self._now:
            self._now = now
        if member.available(self._now):
            if pos < 0:
                member.index_pos = len(self.members)
                self.members.append(member)
                self.picker.joined(member, self.members)
            else:
                self.picker.moved(member)
            return
        if pos >= 0:
            self._leave(member)
        at = member.recheck_at()
        if at is not None and at != member.index_due:
            member.index_due = at
            heapq.heappush(self._due, (at, next(self._seq), member))

    def settle(self, now: float) -> None:
        """Re-check the members whose availability time alone may have changed by ``now``."""
        if now > self._now:
            self._now = now
        due = self._due
        while due and due[0][0] <= self._now:
            at, _, member = heapq.heappop(due)
            if member.index_due == at:  # else superseded by a later re-check, or dropped
                member.index_due = None
                self.refresh(member)

    # -- picking --------------------------------------------------------------------
    def pick(self, excluded: tuple[M, ...] = ()) -> M | None:
        """The picker's choice among the available members not in ``excluded`` (available members,
        each once); None when there is none."""
        members = self.members
        n = len(members)
        for member in excluded:  # swap each to the tail: the picker draws from members[:n]
            n -= 1
            pos, other = member.index_pos, members[n]
            members[pos], members[n] = other, member
            other.index_pos, member.index_pos = pos, n
        if n <= 0:
            return None
        return self.picker.pick(members, n, excluded)  # type: ignore[return-value]  # one of members: an M

    def _leave(self, member: M) -> None:
        members = self.members
        last = members.pop()
        if last is not member:
            members[member.index_pos] = last
            last.index_pos = member.index_pos
        member.index_pos = OUT
        self.picker.left(member, members)
