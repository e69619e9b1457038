"""Diagnose leaked sockets: who holds each one, and is any code still working with it.

A creation line says where a socket was opened; the fix is often elsewhere.
For every leak this module answers:

- **held by**: up to 3 shortest reference paths from a root (module globals,
  the live frames of threads and asyncio tasks, pytest fixture values) to the
  socket, or to the Python object owning a descriptor made in C (a psycopg2
  connection, as its integration recorded it), written as a person names them:
  ``app.cache.REGISTRY['eu'].conn``, ``thread 'worker-3' in handle() local self.request``;
- **in use**: the thread (and task) whose live frame holds it a few steps from a
  local variable, and where that code is now;
- **verdict**: ``in_use`` (that), ``idle_in_pool`` (its pool's integration says it
  is idle), ``forgotten`` (reachable, and no running code holds it: a missing
  ``close()``) or ``unreachable`` (only a reference cycle keeps it).

Cost: nothing for a snapshot without leaks, and nothing until a diagnosis is
read (:class:`Batch`); then one walk for all the snapshot's leaks.  The walk
goes breadth first from the roots one level at a time, each level's referents
taken by ``gc.get_referents`` a chunk of objects at a time and checked against
the targets by identity in C (``map``/``compress`` over ids: no Python loop per
object, no ``gc.get_referrers``), built-in containers of more than ``BIG`` items
last, and stops as soon as every target is found: a million-item list beside
the global that holds the leaks is never read.  The paths are rebuilt
afterwards from the few parents needed.  A budget of objects and of
seconds bounds it; past it the diagnosis says "gave up after N objects".
The walk is compiled (``leakguard._walk``: the same levels in the same order through
each object's ``tp_traverse``, in C) where it is built, this Python walk elsewhere.  Across diagnoses a path
found once is re-checked step by step (each object's referent at the recorded offset is still the next one):
while it holds, that leak is not walked again; what was unreachable stays so; only new leaks and broken paths
are walked.  The in-use check, bounded, runs every time.
Sockets leakguard never saw created are found among the collector's objects
by their C-level descriptor (no ``fileno()`` of arbitrary objects is called).
"""

from __future__ import annotations

import _socket
import bisect
import collections
import gc
import itertools
import linecache
import operator
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import registry, stacks
from ._value import Value

try:  # the compiled walk (absent: no compiler, a free-threaded build, not CPython)
    from ._walk import walk as _native  # type: ignore[import-not-found]
except ImportError:
    _native = None

if TYPE_CHECKING:
    from .snapshot import SocketInfo

__all__ = ["BUDGET_OBJECTS", "BUDGET_SECONDS", "VERDICTS", "Batch", "Cache", "Diagnosis", "run"]

#: Every verdict (bounded: the metrics label takes its values from here).
VERDICTS = ("forgotten", "in_use", "idle_in_pool", "unreachable")
#: Referents examined at most by one diagnosis, and its time limit (checked between levels).
BUDGET_OBJECTS = 5_000_000
BUDGET_SECONDS = 2.0
#: Reference hops from a frame's local within which the frame counts as using the object (local, attribute,
#: item: ``local writer._transport._sock``); an instance's ``__dict__`` step is not counted.
IN_USE_STEPS = 3
MAX_PATHS = 3

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
_OWN_DIRS = (_HERE, stacks._INTEGRATIONS_DIR)
_is_socket = _socket.socket.__instancecheck__
_fileno = _socket.socket.fileno  # the C method: reads the descriptor, runs no Python code


class Diagnosis(Value):
    """The diagnosis of one leak (see ``CONTRACT.md``, Diagnosis)."""

    verdict: str
    why: str
    held_by: list[str]
    in_use: dict[str, Any] | None

    def __init__(self, verdict: str, why: str, held_by: list[str], in_use: dict[str, Any] | None) -> None:
        self.verdict = verdict
        self.why = why
        self.held_by = held_by
        self.in_use = in_use


Subject = tuple[Any, "int | None", "str | None", "registry.Record | None"]


def key(fd: int | None, record: registry.Record | None) -> Any:
    """What names one leak within its batch: its descriptor (or its record when the fd is unknown)."""
    return fd if fd is not None else ("record", id(record))


class Batch:
    """The leaks of one snapshot, diagnosed together on first use (one heap walk for all)."""

    __slots__ = ("_done", "_lock", "cache", "members", "roots", "settled", "subjects")

    def __init__(self, settled: tuple[Any, ...] = (), roots: tuple[tuple[str, Any], ...] = ()) -> None:
        #: frames not counted as running code (a no_leaks block's own frame, done with the block)
        self.settled = settled
        #: more roots as (label, object), e.g. the pytest plugin's live fixture values ("fixture `client`")
        self.roots = roots
        # (key, fd, state, record) of each leak; not the SocketInfos, which hold the batch (no cycle)
        self.subjects: list[Subject] = []
        #: a watcher's diagnoses of its last snapshot (see :class:`Cache`), and each leak's (group, identity)
        self.cache: Cache | None = None
        self.members: dict[Any, tuple[str, Any]] = {}
        self._done: dict[Any, Diagnosis] | None = None
        self._lock = threading.Lock()

    def add(self, fd: int | None, state: str | None, record: registry.Record | None) -> None:
        self.subjects.append((key(fd, record), fd, state, record))

    def of(self, info: SocketInfo) -> Diagnosis:
        done = self._done
        if done is None:
            with self._lock:
                done = self._done
                if done is None:
                    cache = self.cache
                    if cache is not None:
                        done = cache.diagnose(self)
                    else:
                        done = run(self.subjects, settled=self.settled, roots=self.roots)
                    self._done = done
        d = done.get(key(info.fd, info.record))
        return d if d is not None else _failed("not part of its snapshot's diagnosis")


class Cache:
    """Diagnoses kept from one snapshot to the next (the watcher's): a group of leaks, those of one creation
    site, with the same members as at its last diagnosis is not walked again; the leaks of a new or changed
    group are, together, in one walk.  ``walked`` counts the leaks walked, ``reused`` those answered from here,
    ``walks[site]`` the walks that diagnosed each group.
    A group's ``in_use.now_at`` is therefore where its code was when the group last changed."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[frozenset[Any], dict[Any, Diagnosis]]] = {}
        self._lock = threading.Lock()
        self.walked = 0
        self.reused = 0
        self.walks: collections.Counter[str] = collections.Counter()

    def attach(self, leaks: Iterable[SocketInfo]) -> None:
        """Have the batch of these leaks (one snapshot's) diagnose through this cache."""
        for info in leaks:
            batch = info[10]
            if batch is None:
                continue
            batch.cache = self
            rec = info.record
            group = info.site_str if rec is not None and info.stack else "<unknown>"
            # what stays the same for the same socket from one snapshot to the next (a reused fd differs)
            ident = (info.fd, info.state, info.local, info.remote, rec.created if rec is not None else None)
            batch.members[key(info.fd, rec)] = (group, ident)

    def diagnose(self, batch: Batch) -> dict[Any, Diagnosis]:
        with self._lock:
            by_group: dict[str, list[tuple[Subject, Any]]] = {}
            for sub in batch.subjects:
                group, ident = batch.members.get(sub[0], ("<unknown>", ("key", sub[0])))
                by_group.setdefault(group, []).append((sub, ident))
            out: dict[Any, Diagnosis] = {}
            todo: list[Subject] = []
            changed: list[str] = []
            for group, members in by_group.items():
                prev = self._groups.get(group)
                if prev is not None and prev[0] == frozenset(ident for _, ident in members):
                    for sub, ident in members:
                        out[sub[0]] = prev[1][ident]
                    self.reused += len(members)
                else:
                    todo += [sub for sub, _ in members]
                    changed.append(group)
            fresh = run(todo, settled=batch.settled, roots=batch.roots) if todo else {}
            self.walked += len(todo)
            self.walks.update(changed)
            out.update(fresh)
            groups = {g: v for g, v in self._groups.items() if g in by_group}  # a resolved group is forgotten
            for group in changed:
                members = by_group[group]
                if any(out[sub[0]].why.startswith("not diagnosed") for sub, _ in members):
                    continue  # the walk failed (contained): the next snapshot tries again
                groups[group] = (frozenset(i for _, i in members), {i: out[sub[0]] for sub, i in members})
            self._groups = groups
            return out


def _failed(what: str) -> Diagnosis:
    return Diagnosis("forgotten", f"not diagnosed ({what})", [], None)


# --------------------------------------------------------------------------------------------- roots


class _Root:
    """Where a path starts: a module's globals, a frame's local, a fixture value."""

    __slots__ = ("awaited", "label", "module", "stack", "task", "thread")

    def __init__(
        self,
        label: str,
        module: bool = False,
        thread: str | None = None,
        task: str | None = None,
        stack: list[Any] | None = None,
        awaited: Any = None,
    ) -> None:
        self.label = label
        self.module = module  # the object is a module's __dict__: its keys read as attributes
        self.thread = thread
        self.task = task
        self.stack = stack or []  # the frames of that thread / task, innermost first: where its code is now
        self.awaited = awaited  # for a task: what its innermost coroutine awaits


def _own(code: Any) -> bool:
    return bool(code.co_filename.startswith(_OWN_DIRS))


def _frame_locals(frame: Any) -> list[tuple[str, Any]]:
    try:
        if frame.f_locals is frame.f_globals:  # module-level code: its names are the module's globals
            return []
        return list(frame.f_locals.items())
    except Exception:
        return []


def _thread_roots(out: list[tuple[_Root, Any]], settled: list[tuple[_Root, Any]], settled_ids: set[int]) -> None:
    names = {t.ident: t.name for t in threading.enumerate()}
    for tid, top in sys._current_frames().items():
        name = names.get(tid, f"thread {tid}")
        chain = []
        f: types.FrameType | None = top
        while f is not None:
            if not _own(f.f_code):
                chain.append(f)
            f = f.f_back
        if not chain:
            continue  # a thread of leakguard's own (the watcher)
        for fr in chain:
            if id(fr) in settled_ids:  # the checked block's own frame: it holds, but is done with the block
                for local, value in _frame_locals(fr):
                    settled.append((_Root(f"{fr.f_code.co_name}() local {local}"), value))
                continue
            label = f"thread {name!r} in {fr.f_code.co_name}()"
            for local, value in _frame_locals(fr):
                out.append((_Root(f"{label} local {local}", thread=name, stack=chain), value))


def _tasks() -> list[Any]:
    tasks = sys.modules.get("asyncio.tasks")
    if tasks is None:
        return []
    found: list[Any] = []
    for attr in ("_all_tasks", "_scheduled_tasks", "_eager_tasks"):
        group = getattr(tasks, attr, None)
        if group is not None:
            try:
                found.extend(list(group))
            except Exception:
                pass
    return found


def _await_chain(coro: Any) -> tuple[list[Any], Any]:
    """The frames of a task's coroutine and of those it awaits, outermost first, and the awaited non-coroutine."""
    frames, c, seen = [], coro, 0
    while c is not None and seen < 100:
        seen += 1
        fr = getattr(c, "cr_frame", None) or getattr(c, "gi_frame", None) or getattr(c, "ag_frame", None)
        if fr is None:
            break
        frames.append(fr)
        nxt = getattr(c, "cr_await", None) if hasattr(c, "cr_await") else getattr(c, "gi_yieldfrom", None)
        if nxt is None or not (hasattr(nxt, "cr_frame") or hasattr(nxt, "gi_frame")):
            return frames, nxt
        c = nxt
    return frames, None


def _task_roots(out: list[tuple[_Root, Any]]) -> None:
    names = {t.ident: t.name for t in threading.enumerate()}
    for task in _tasks():
        try:
            if task.done():
                continue
            tname = task.get_name()
            frames, awaited = _await_chain(task.get_coro())
            loop_tid = getattr(task.get_loop(), "_thread_id", None)
        except Exception:
            continue
        if not frames:
            continue
        thread = names.get(loop_tid, "no running loop") if loop_tid is not None else "no running loop"
        stack = frames[::-1]
        for fr in frames:
            label = f"task {tname!r} in {fr.f_code.co_name}()"
            for local, value in _frame_locals(fr):
                out.append((_Root(f"{label} local {local}", thread=thread, task=tname, stack=stack, awaited=awaited), value))


def _module_roots(out: list[tuple[_Root, Any]], own: set[int]) -> None:
    """Each module's ``__dict__`` as a root; the module objects themselves into *own*, never walked: their dicts
    are roots already, and an extension module's traverse can visit what is not a live object (3.12's
    ``_asyncio`` visits its free list of future iterators: ``gc.get_referents`` runs out of memory)."""
    for name, mod in list(sys.modules.items()):
        if not isinstance(mod, types.ModuleType):
            continue
        own.add(id(mod))
        try:
            d = object.__getattribute__(mod, "__dict__")
        except Exception:
            continue
        if name == "leakguard" or name.startswith("leakguard."):
            own.add(id(d))
            continue
        out.append((_Root(name, module=True), d))




# --------------------------------------------------------------------------------------------- the walk


class _Budget:
    __slots__ = ("deadline", "gave_up", "limit", "used")

    def __init__(self, objects: int, seconds: float) -> None:
        self.limit = objects
        self.used = 0
        self.deadline = time.monotonic() + seconds
        self.gave_up = False

    def spend(self, n: int) -> bool:
        """Account for *n* more objects; False (and gave_up) once over the budget."""
        if self.used + n > self.limit or time.monotonic() > self.deadline:
            self.gave_up = True
            return False
        self.used += n
        return True


_get_referents = gc.get_referents
_NOT = bytes([1, 0]) + bytes(254)  # bytes.translate table: 0 <-> 1
_is_tracked = gc.is_tracked


#: Objects per ``gc.get_referents`` call in a level, and the size from which a container is read last in its
#: level (only when targets remain once the rest of the level is read: a list of a million objects beside the
#: module global that holds the leaks costs nothing).
CHUNK = 2048
BIG = 16_384
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
_BIG_LT = BIG.__lt__


def _big_positions(chunk: list[Any]) -> list[int]:
    """Indices in *chunk* of built-in containers of more than BIG items (their exact type: len() runs no Python)."""
    cand = list(itertools.compress(itertools.count(), map(_CONTAINERS.__contains__, map(type, chunk))))
    if not cand:
        return []
    return list(itertools.compress(cand, map(_BIG_LT, map(len, map(chunk.__getitem__, cand)))))


def _spans(level: list[Any]) -> Iterator[tuple[int, int, list[Any] | None]]:
    """(lo, hi, referents of level[lo:hi]) covering *level* in order, chunks of at most CHUNK objects, each big
    container alone and not read yet (None)."""
    for start in range(0, len(level), CHUNK):
        chunk = level[start : start + CHUNK]
        lo = 0
        for b in [*_big_positions(chunk), len(chunk)]:
            if lo < b:
                yield start + lo, start + b, _get_referents(*chunk[lo:b])
            if b < len(chunk):
                yield start + b, start + b + 1, None
            lo = b + 1


class _Part:
    """``level[lo:hi]`` and their referents in one list (``gc.get_referents(*level[lo:hi])``); ``first``: the
    index in the next level of the first object met here (the parts of a level fill the next one in order)."""

    __slots__ = ("cum", "first", "flat", "hi", "lo")

    def __init__(self, lo: int, hi: int, flat: list[Any] | None) -> None:
        self.lo, self.hi, self.flat = lo, hi, flat
        self.cum: list[int] | None = None
        self.first = 0


class _Walk:
    """Breadth-first levels from the roots; ``hits`` maps a target's id to up to MAX_PATHS (level, parent, offset).

    ``levels[k]`` holds the objects first met k steps from the roots, ``parts[k]`` their referents, a chunk of
    ``levels[k]`` at a time (each object's referents in turn).  Nothing per object is done in Python: ids, the
    seen set and the target check are ``map``, ``compress`` and set operations.  A level is read for targets
    first, big containers last, and ends the walk when they are all found, before any of it is recorded as
    seen; only a level that does not is taken into the seen set and makes the next one (tracked objects only:
    atoms refer to nothing).  A target's parent is the object whose run of referents holds it, found by
    bisecting the cumulative referent counts of its chunk, made only for the chunks on a path.
    """

    def __init__(self, starts: list[Any], seen: set[int], budget: _Budget) -> None:
        self.levels: list[list[Any]] = [starts]
        self.parts: list[list[_Part]] = []
        self.seen = seen
        self.seen.update(map(id, starts))
        self.budget = budget
        self.hits: dict[int, list[tuple[int, int, int]]] = {}
        self.complete = False  # every object reachable from the starts was examined
        self._last: tuple[Any, list[Any]] = (None, [])  # the object whose referents _locate read last, and those

    def _hit(self, tid: int, hit: tuple[int, int, int]) -> None:
        found = self.hits.setdefault(tid, [])
        if len(found) < MAX_PATHS:
            found.append(hit)

    def _scan(self, k: int, part: _Part, remaining: set[int]) -> None:
        """Record the targets among *part*'s referents (a mask of bytes and find(), i.e. memchr: no object per
        position, no ids kept)."""
        flat = part.flat
        assert flat is not None
        mask = bytes(map(remaining.__contains__, map(id, flat)))
        p = mask.find(1)
        while p >= 0:
            self._hit(id(flat[p]), (k, *self._locate(k, part, p)))
            p = mask.find(1, p + 1)

    def search(self, targets: set[int], max_level: int | None = None) -> None:
        """Walk until every id in *targets* is found, the reachable heap is exhausted, or the budget ends."""
        remaining = set(targets)
        starts = self.levels[0]
        for i in itertools.compress(itertools.count(), map(remaining.__contains__, map(id, starts))):
            self._hit(id(starts[i]), (-1, i, 0))  # a root that is itself a target (a local holding the socket)
        remaining.difference_update(self.hits)
        k = 0
        while remaining:
            if max_level is not None and k >= max_level:
                return
            level = self.levels[k]
            if not level:
                self.complete = True
                return
            parts: list[_Part] = []
            later: list[_Part] = []
            self.parts.append(parts)
            for lo, hi, flat in _spans(level):
                if not self.budget.spend(hi - lo):
                    return
                part = _Part(lo, hi, flat)
                del flat
                parts.append(part)
                if part.flat is None or len(part.flat) > BIG:
                    later.append(part)
                    continue
                if not self.budget.spend(len(part.flat)):
                    return
                self._scan(k, part, remaining)
            remaining.difference_update(self.hits)
            for part in later:
                if not remaining:
                    return
                if part.flat is None:
                    part.flat = _get_referents(level[part.lo])
                if not self.budget.spend(len(part.flat)):
                    return
                self._scan(k, part, remaining)
                remaining.difference_update(self.hits)
            if not remaining:
                return
            nxt: list[Any] = []
            seen = self.seen
            for part in parts:
                part.first = len(nxt)
                flat = list(filter(_is_tracked, part.flat or ()))  # untracked objects refer to nothing the walk needs
                ids = list(map(id, flat))
                fresh = bytes(map(seen.__contains__, ids)).translate(_NOT)
                new_ids = list(itertools.compress(ids, fresh))
                unique = set(new_ids)
                if len(unique) == len(new_ids):  # no tuple per object (dict(zip()) makes one: collections run)
                    nxt += itertools.compress(flat, fresh)
                else:  # an object met twice in this part: once in the level
                    nxt += dict(zip(new_ids, itertools.compress(flat, fresh))).values()
                del ids, fresh, flat, new_ids
                seen.update(unique)
            self.levels.append(nxt)
            k += 1

    def _locate(self, k: int, part: _Part, p: int) -> tuple[int, int]:
        """Position *p* of *part* (of level k) as (index of its object in levels[k], offset among its referents)."""
        level, flat = self.levels[k], part.flat
        assert flat is not None
        child = flat[p]
        if part.hi - part.lo == 1:
            return part.lo, p
        cum = part.cum
        if cum is None:
            cum = part.cum = list(itertools.accumulate(map(len, map(_get_referents, level[part.lo : part.hi]))))
        at = bisect.bisect_right(cum, p)
        offset = p - (cum[at - 1] if at else 0)
        if at < len(cum):
            parent = level[part.lo + at]
            last = self._last
            if last[0] is not parent:
                last = self._last = (parent, _get_referents(parent))
            refs = last[1]
            if offset < len(refs) and refs[offset] is child:
                return part.lo + at, offset
        # Another thread changed a container since the level was read: look for a parent one by one.
        for i in range(part.lo, part.hi):
            for j, r in enumerate(_get_referents(level[i])):
                if r is child:
                    return i, j
        raise LookupError("the path changed during the diagnosis")

    def chains(self, hits: list[tuple[int, int, int]]) -> list[tuple[int, list[tuple[Any, int]]] | None]:
        """For each hit: the root index and the path below it, [(object, offset of the next one), ...]; or None.

        All hits at once, one level at a time: each object's parent is in the part of the level above that met it
        first (found by bisecting the parts' ``first``), so only those parts' referents are read.
        """
        cur: list[tuple[int, int] | None] = []
        paths: list[list[tuple[Any, int]]] = []
        for k, index, offset in hits:
            cur.append((k, index))
            paths.append([(self.levels[k][index], offset)] if k >= 0 else [])
        for k in range(max((h[0] for h in hits), default=0), 0, -1):
            # The object at index i of level k was met in the last part of level k-1 whose first is <= i.
            parts = self.parts[k - 1]
            firsts = [part.first for part in parts]
            by_part: dict[int, set[int]] = {}
            for c in cur:
                if c is not None and c[0] == k:
                    by_part.setdefault(bisect.bisect_right(firsts, c[1]) - 1, set()).add(id(self.levels[k][c[1]]))
            if not by_part:
                continue
            pos: dict[int, tuple[_Part, int]] = {}
            for j, ids in by_part.items():
                flat = parts[j].flat or ()
                for p in itertools.compress(itertools.count(), map(ids.__contains__, map(id, flat))):
                    pos.setdefault(id(flat[p]), (parts[j], p))
            for j, c in enumerate(cur):
                if c is None or c[0] != k:
                    continue
                at = pos.get(id(self.levels[k][c[1]]))
                try:
                    if at is None:
                        raise LookupError
                    parent, offset = self._locate(k - 1, *at)
                except LookupError:
                    cur[j] = None
                    continue
                paths[j].append((self.levels[k - 1][parent], offset))
                cur[j] = (k - 1, parent)
        out: list[tuple[int, list[tuple[Any, int]]] | None] = []
        for c, path in zip(cur, paths):
            out.append((c[1], path[::-1]) if c is not None else None)
        return out


# --------------------------------------------------------------------------------------------- naming

_MISSING = object()


def _dict_of(obj: Any) -> Any:
    if isinstance(obj, type):
        try:
            refs = _get_referents(obj.__dict__)  # the mappingproxy's dict
            return refs[0] if refs else None
        except Exception:
            return None
    try:
        return object.__getattribute__(obj, "__dict__")
    except Exception:
        return None


def _key_repr(k: Any) -> str:
    if isinstance(k, (str, int, float, bytes, bool)) or k is None:
        r = repr(k)
        return r if len(r) <= 40 else r[:37] + "..."
    if isinstance(k, tuple):
        return ", ".join(_key_repr(x) for x in k[:3]) + (", ..." if len(k) > 3 else "")
    return f"<{type(k).__qualname__}>"


def _slot_name(obj: Any, child: Any) -> str | None:
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            desc = cls.__dict__.get(name)
            if isinstance(desc, types.MemberDescriptorType):
                try:
                    if desc.__get__(obj) is child:
                        return str(name)
                except AttributeError:
                    pass
    return None


class _Namer:
    """Writes a path as a person names it; a dict's keys by value are looked up once per diagnosis."""

    def __init__(self) -> None:
        self._keys: dict[int, dict[int, Any]] = {}
        self._held: list[Any] = []  # the dicts keyed above, alive while their ids are
        self._prefixes: dict[tuple[Any, ...], tuple[str, int]] = {}  # by ids of objects on paths, alive meanwhile

    def key(self, d: Any, child: Any) -> Any:
        keys = self._keys.get(id(d))
        if keys is None:
            try:
                keys = dict(zip(map(id, dict.values(d)), dict.keys(d)))
            except Exception:  # changed size meanwhile
                keys = {}
            self._keys[id(d)] = keys
            self._held.append(d)
        return keys.get(id(child), _MISSING)

    def step(self, parent: Any, child: Any, offset: int, prev: Any, root: _Root | None) -> str:
        """How *parent* refers to *child* (*prev*: the object before *parent*; *root*: where the path starts)."""
        if isinstance(parent, dict):
            k = self.key(parent, child)
            if k is _MISSING:
                return " (a dict key)"
            as_attr = (root is not None and root.module) or (prev is not None and _dict_of(prev) is parent)
            if as_attr and isinstance(k, str) and k.isidentifier():
                return f".{k}"
            return f"[{_key_repr(k)}]"
        if isinstance(parent, (list, tuple)):
            if isinstance(prev, types.FunctionType) and parent is prev.__closure__:
                return ""  # a closure: the cell's step names the variable
            get: Any = list.__getitem__ if isinstance(parent, list) else tuple.__getitem__  # no __getitem__ override
            size = len(parent)
            for i in (size - 1 - offset, offset):  # lists and tuples give their referents last item first
                if 0 <= i < size and get(parent, i) is child:
                    return f"[{i}]"
            items: Any = list.copy(parent) if isinstance(parent, list) else tuple(parent)
            found = next((i for i in range(len(items)) if items[i] is child), None)
            return f"[{found}]" if found is not None else f" -> {type(child).__qualname__}"
        if isinstance(parent, types.CellType):
            return " (closure variable)"
        if isinstance(parent, types.ModuleType) or isinstance(child, dict) and _dict_of(parent) is child:
            return ""  # into an object's __dict__: the next step names the attribute
        if isinstance(parent, types.MethodType) and parent.__self__ is child:
            return ".__self__"
        d = _dict_of(parent)
        if isinstance(d, dict):
            k = self.key(d, child)
            if isinstance(k, str):
                return f".{k}"
        name = _slot_name(parent, child)
        if name is not None:
            return f".{name}"
        if isinstance(parent, collections.deque):  # its referents are its items, in order
            return f"[{offset}]"
        return f" -> {type(child).__qualname__}"

    def render(self, root: _Root, path: list[tuple[Any, int]], target: Any) -> tuple[str, int]:
        """The path as text, and its number of named steps (a step into an instance's __dict__ does not count).

        All but the last step are named once per diagnosis: the leaks in one container share them."""
        if not path:
            return root.label, 1
        last, offset = path[-1]
        key = (id(root), *[(id(o), off) for o, off in path[:-1]], id(last))
        done = self._prefixes.get(key)
        if done is None:
            text, steps = root.label, 1
            objs = [o for o, _ in path]
            for i in range(len(path) - 1):
                seg = self.step(objs[i], objs[i + 1], path[i][1], objs[i - 1] if i else None, root if i == 0 else None)
                steps += bool(seg)
                text += seg
            done = self._prefixes[key] = (text, steps)
        n = len(path)
        seg = self.step(last, target, offset, path[-2][0] if n > 1 else None, root if n == 1 else None)
        return done[0] + seg, done[1] + bool(seg)


# --------------------------------------------------------------------------------------------- in use


_WAITS = (  # (substring of the line being executed, what that waits on)
    (".acquire(", "a lock (acquire)"),
    ("sleep(", "a sleep"),
    (".recv", "a socket read (recv)"),
    (".accept(", "a socket accept"),
    (".read(", "a read"),
    (".readline(", "a read"),
    ("execute(", "a database call (execute)"),
    ("fetch", "a database call (fetch)"),
    (".join(", "another thread (join)"),
    (".wait(", "an event or condition (wait)"),
    (".get(", "a queue or a call (get)"),
    ("select(", "I/O readiness (select)"),
    ("await ", "an awaited operation"),
)
_LIB_WAITS = {  # (module file name, function) -> what it waits on
    ("threading.py", "wait"): "a threading.Condition or Event (wait)",
    ("threading.py", "acquire"): "a threading.Semaphore (acquire)",
    ("threading.py", "_wait_for_tstate_lock"): "another thread to finish (join)",
    ("threading.py", "join"): "another thread to finish (join)",
    ("queue.py", "get"): "a queue.Queue (get)",
    ("queue.py", "put"): "a full queue.Queue (put)",
    ("socket.py", "readinto"): "a socket read",
    ("socket.py", "accept"): "a socket accept",
    ("selectors.py", "select"): "I/O readiness (select)",
    ("ssl.py", "read"): "a TLS read",
    ("ssl.py", "recv"): "a TLS read",
    ("ssl.py", "recv_into"): "a TLS read",
    ("tasks.py", "sleep"): "asyncio.sleep",
    ("locks.py", "wait"): "an asyncio.Event or Condition (wait)",
    ("locks.py", "acquire"): "an asyncio.Lock (acquire)",
    ("queues.py", "get"): "an asyncio.Queue (get)",
    ("streams.py", "_wait_for_data"): "data from the peer (StreamReader read)",
    ("streams.py", "read"): "data from the peer (StreamReader read)",
    ("streams.py", "readline"): "data from the peer (StreamReader read)",
    ("streams.py", "readexactly"): "data from the peer (StreamReader read)",
    ("streams.py", "readuntil"): "data from the peer (StreamReader read)",
}


def _waits_on(frame: Any, awaited: Any, is_task: bool) -> str:
    code = frame.f_code
    lib = _LIB_WAITS.get((os.path.basename(code.co_filename), code.co_name))
    if lib is not None:
        what = lib
    else:
        line = linecache.getline(code.co_filename, frame.f_lineno).strip()
        what = next((w for s, w in _WAITS if s in line), "")
        if not what:
            what = f"the call on line {frame.f_lineno}" if line else "not visible"
        if line:
            what += f": `{line[:80]}`"
    if is_task:
        if awaited is not None and type(awaited).__name__ not in ("FutureIter", "Future", "generator"):
            what += f" (awaiting a {type(awaited).__qualname__})"
        return what
    if lib is not None:  # the standard library function it is in says what it waits for
        return what
    return what + " (a wait in C is not visible from Python: this is the line the thread is on)"


def _in_use(root: _Root) -> dict[str, Any]:
    """Where the code holding it is now: its innermost application frame (file, line, function), the innermost
    frame of all (``now_at``) and what that waits on."""
    where = root.stack[0]
    shown = next((fr for fr in root.stack if stacks.is_app_file(fr.f_code.co_filename)), where)
    return {
        "thread": root.thread,
        "task": root.task,
        "file": shown.f_code.co_filename,
        "line": shown.f_lineno,
        "function": shown.f_code.co_name,
        "now_at": f"{stacks.relpath(where.f_code.co_filename)}:{where.f_lineno} in {where.f_code.co_name}()",
        "waits_on": _waits_on(where, root.awaited, root.task is not None),
    }


# --------------------------------------------------------------------------------------------- run


def _sockets_by_fd(fds: set[int]) -> dict[int, list[Any]]:
    """The socket objects among the collector's objects whose C-level descriptor is in *fds*."""
    found: dict[int, list[Any]] = {}
    for obj in filter(_is_socket, gc.get_objects()):
        try:
            fd = _fileno(obj)
        except Exception:
            continue
        if fd in fds:
            found.setdefault(fd, []).append(obj)
    return found


def run(
    subjects: list[Subject],
    budget_objects: int | None = None,
    budget_seconds: float | None = None,
    settled: tuple[Any, ...] = (),
    roots: Iterable[tuple[str, Any]] = (),
) -> dict[Any, Diagnosis]:
    """Diagnose *subjects* ``(key, fd, state, record)``: key -> :class:`Diagnosis`. Never raises.

    *settled*: frames whose locals hold but do not use (they are roots of held_by paths, never in_use).
    *roots*: more roots as (label, object).
    """
    roots = tuple(roots)
    error: Exception | None = None
    for _ in range(3):
        try:
            return _run(subjects, budget_objects or BUDGET_OBJECTS, budget_seconds or BUDGET_SECONDS, settled, roots)
        except RuntimeError as exc:  # another thread resized a dict or set the walk was reading: walk again
            error = exc
        except Exception as exc:  # a diagnosis must never break a snapshot
            error = exc
            break
    registry.count_error()
    return {k: _failed(f"{type(error).__name__}: {error}") for k, _, _, _ in subjects}


def _run(
    subjects: list[Subject],
    budget_objects: int,
    budget_seconds: float,
    settled: tuple[Any, ...],
    extra: Iterable[tuple[str, Any]],
) -> dict[Any, Diagnosis]:
    started = time.monotonic()
    out: dict[Any, Diagnosis] = {}
    # 1. The Python object behind each leak: its record's socket or owner, else a socket.socket with that fd.
    objs: dict[Any, list[Any]] = {}
    unknown: dict[int, Any] = {}
    for k, fd, _, rec in subjects:
        obj = rec.ref() if rec is not None and rec.ref is not None else None
        if obj is not None:
            objs[k] = [obj]
        elif fd is not None:
            unknown[fd] = k
    if unknown:
        for fd, found in _sockets_by_fd(set(unknown)).items():
            objs[unknown[fd]] = found
    pending: list[Subject] = []
    for sub in subjects:
        k, _, _, rec = sub
        pool = rec.pool if rec is not None else None
        if k not in objs:
            out[k] = Diagnosis(
                "forgotten",
                "no Python object holds this descriptor (opened in C, or the socket was detach()ed):"
                " nothing in the program will close it",
                [],
                None,
            )
        else:
            pending.append(sub)
        if pool is not None and not pool.checked_out:
            out[k] = Diagnosis(
                "idle_in_pool",
                f"it sits idle in pool {pool.name}, which discards it at its next checkout or pre-ping",
                [],
                None,
            )
    if not pending:
        return out
    targets: dict[int, Any] = {}  # id -> key
    target_objs: dict[int, Any] = {}
    for k, _, _, _ in pending:
        for obj in objs[k]:
            targets[id(obj)] = k
            target_objs[id(obj)] = obj
    budget = _Budget(budget_objects, budget_seconds - (time.monotonic() - started))
    own: set[int] = {id(objs), id(targets), id(target_objs), id(subjects), id(out)}
    roots: list[tuple[_Root, Any]] = []
    done_frames: list[tuple[_Root, Any]] = []
    _thread_roots(roots, done_frames, set(map(id, settled)))
    _task_roots(roots)
    n_frames = len(roots)
    roots += done_frames
    roots += [(_Root(label), value) for label, value in extra]
    _module_roots(roots, own)
    own.add(id(roots))
    module_objs = {id(o) for r, o in roots if r.module}

    namer = _Namer()
    # 2. In use: a few steps from a live frame's local (modules and their globals not crossed).
    uses: dict[int, tuple[_Root, str, float]] = {}
    frame_roots = roots[:n_frames]
    wanted = list(target_objs.values())
    own.add(id(wanted))
    if frame_roots:
        found, _ = _search([o for _, o in frame_roots], own | module_objs, budget, wanted, IN_USE_STEPS + 2)
        for tid, ri, path in found:
            text, steps = namer.render(frame_roots[ri][0], path, target_objs[tid])
            root = frame_roots[ri][0]
            rank = steps - 0.5 * (root.task is not None)  # a task says more than the thread running its loop
            if steps <= IN_USE_STEPS and (tid not in uses or rank < uses[tid][2]):
                uses[tid] = (root, text, rank)
        del found

    # 3. Held by: what an earlier diagnosis found, each path re-checked step by step; the shortest paths from every
    # root for the rest, by one walk.
    held, gone, known = _recheck(target_objs, roots)
    todo = [o for tid, o in target_objs.items() if tid not in held and tid not in gone]
    own.add(id(todo))
    complete = True
    if todo:
        found, complete = _search([o for _, o in roots], set(own), budget, todo)
        for tid, ri, path in found:
            text = namer.render(roots[ri][0], path, target_objs[tid])[0]
            held.setdefault(tid, []).append(text)
            known.setdefault(tid, []).append((text, roots[ri][0].label, [(id(o), off) for o, off in path]))
        del found
    examined = budget.used

    for k, _fd, _state, rec in pending:
        if k in out:  # idle in its pool: the paths still say who keeps the pool
            d = out[k]
            d.held_by = _paths(objs[k], uses, held)
            continue
        paths = _paths(objs[k], uses, held)
        use = next((uses[id(o)] for o in objs[k] if id(o) in uses), None)
        if use is not None:
            info = _in_use(use[0])
            out[k] = Diagnosis(
                "in_use",
                f"a live frame holds it ({use[1]}) and that code is still running, now at {info['now_at']},"
                f" waiting on {info['waits_on']}: the code that would close it has not got there (stuck,"
                " slow, or short of workers), not a forgotten close()",
                paths,
                info,
            )
        elif paths:
            pool = rec.pool if rec is not None else None
            how = f" (checked out of pool {pool.name})" if pool is not None and pool.checked_out else ""
            out[k] = Diagnosis(
                "forgotten", f"{paths[0]} keeps it{how} and no running code holds it: a missing close()", paths, None
            )
        elif complete or all(id(o) in gone for o in objs[k]):
            gone.update(map(id, objs[k]))
            gc_note = (
                "the garbage collector will close it at its next collection"
                if gc.isenabled()
                else "the garbage collector is disabled, so nothing will close it"
            )
            out[k] = Diagnosis(
                "unreachable", f"nothing reachable refers to it (only a reference cycle keeps it): {gc_note}", [], None
            )
        else:
            out[k] = Diagnosis(
                "forgotten",
                f"no holder found within the diagnosis budget (gave up after {examined:,} objects,"
                f" {time.monotonic() - started:.2f} s); it may also be unreachable",
                [],
                None,
            )
    _remember(target_objs, known, gone)
    return out


# ------------------------------------------------------------------------------------ across diagnoses

#: What earlier diagnoses found, by target id: (a weak reference to the target or None, unreachable,
#: [(text, root label, [(id, offset of the next object among its referents), ...]), ...]).  Ids and offsets
#: only: nothing here keeps an object of the program alive.
_known: dict[int, tuple[Any, bool, list[tuple[str, str, list[tuple[int, int]]]]]] = {}
Known = dict[int, list[tuple[str, str, list[tuple[int, int]]]]]


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _recheck(targets: dict[int, Any], roots: list[tuple[_Root, Any]]) -> tuple[dict[int, list[str]], set[int], Known]:
    """The targets an earlier diagnosis answered, if that answer still holds: (held paths whose every step still
    holds, by target id; targets found unreachable then, which stay so; the paths kept, to remember again).

    A path holds when, from the root with its label, each object's referent at the recorded offset is the next
    object recorded (the same id): a real path of the heap as it is now, whatever changed elsewhere.  An object
    nothing reachable refers to cannot become reachable again (no code can reach it to store it), so an
    unreachable target stays unreachable.  A target whose paths all broke is walked again."""
    held: dict[int, list[str]] = {}
    gone: set[int] = set()
    kept: Known = {}
    known = _known
    if not known:
        return held, gone, kept
    by_label: dict[str, Any] = {}
    for root, obj in roots:
        by_label.setdefault(root.label, obj)
    referents: dict[int, list[Any]] = {}  # per object on a path, read once per diagnosis
    for tid, target in targets.items():
        entry = known.get(tid)
        if entry is None:
            continue
        ref, unreachable, paths = entry
        if unreachable:
            if ref is not None and ref() is target:
                gone.add(tid)
            continue
        for text, label, steps in paths:
            cur = by_label.get(label, _MISSING)
            if steps and id(cur) != steps[0][0]:
                continue
            for i, (oid, offset) in enumerate(steps):
                refs = _referents_of(cur, referents)
                want = steps[i + 1][0] if i + 1 < len(steps) else tid
                cur = refs[offset] if offset < len(refs) else _MISSING
                if id(cur) != want:
                    cur = _through_dict(refs, want, referents)
                    if cur is _MISSING:
                        break
            if cur is target:
                held.setdefault(tid, []).append(text)
                kept.setdefault(tid, []).append((text, label, steps))
    return held, gone, kept


def _referents_of(obj: Any, cache: dict[int, list[Any]]) -> list[Any]:
    refs = cache.get(id(obj))
    if refs is None:
        refs = cache[id(obj)] = _get_referents(obj)
    return refs


def _through_dict(refs: list[Any], want: int, cache: dict[int, list[Any]]) -> Any:
    """The object of id *want* one dict below *refs*: on 3.11/3.12 reading an instance's ``__dict__`` (naming the
    path did) moves its attributes from the instance into a dict of its own, one step further down."""
    for r in refs:
        if type(r) is dict:
            for x in _referents_of(r, cache):
                if id(x) == want:
                    return x
    return _MISSING


def _remember(targets: dict[int, Any], paths: Known, gone: set[int]) -> None:
    """Keep what this diagnosis found for the next: its targets' paths and the unreachable ones (those that can be
    referred to weakly: an id alone could be another object's by then), and what is known of targets still alive."""
    global _known
    known = {tid: e for tid, e in _known.items() if e[0] is not None and e[0]() is not None and tid not in targets}
    for tid, target in targets.items():
        if tid in gone:
            ref = _weak(target)
            if ref is not None:
                known[tid] = (ref, True, [])
        elif tid in paths:
            known[tid] = (_weak(target), False, paths[tid])
    _known = known


Chain = tuple[int, int, list[tuple[Any, int]]]  # (target id, root index, [(object, offset of the next one), ...])


def _search(
    starts: list[Any], seen: set[int], budget: _Budget, targets: list[Any], max_level: int | None = None
) -> tuple[list[Chain], bool]:
    """The paths from *starts* to *targets* (up to MAX_PATHS each, the shortest), never through an object whose id
    is in *seen*; and whether every reachable object was examined.  The compiled walk when there is one, else
    :class:`_Walk`: the same levels in the same order, so the same paths."""
    if _native is not None:
        objects, seconds = budget.limit - budget.used, budget.deadline - time.monotonic()
        if objects <= 0 or seconds <= 0:
            budget.gave_up = True
            return [], False
        hits, used, complete = _native(
            starts, seen, targets, MAX_PATHS, BIG, objects, seconds, -1 if max_level is None else max_level
        )
        budget.used += used
        if budget.used > budget.limit or time.monotonic() > budget.deadline:
            budget.gave_up = True
        return [(id(targets[t]), ri, path) for t, ri, path in hits], complete
    walk = _Walk(starts, seen, budget)
    walk.search(set(map(id, targets)), max_level=max_level)
    flat = [(tid, hit) for tid, hits in walk.hits.items() for hit in hits]
    found = [(tid, *chain) for (tid, _), chain in zip(flat, walk.chains([h for _, h in flat])) if chain is not None]
    return found, walk.complete


def _paths(objs: list[Any], uses: dict[int, tuple[_Root, str, float]], held: dict[int, list[str]]) -> list[str]:
    paths: list[str] = []
    for o in objs:
        if id(o) in uses:
            paths.append(uses[id(o)][1])
    for o in objs:
        for p in held.get(id(o), ()):
            if p not in paths:
                paths.append(p)
    return paths[:MAX_PATHS]
