"""Read the kernel's view of this process's own sockets.

Linux: list ``/proc/self/fd`` (this process only) and ask each socket
descriptor directly: ``getsockopt(TCP_INFO)`` gives the TCP state in its first
byte, ``getsockname``/``getpeername`` the addresses.  The cost depends on this
process's sockets alone, never on how many the machine has (``/proc/net/tcp``
and psutil read every socket of the machine).  Descriptors leakguard never saw
created are queried through a temporary ``_socket.socket`` on the descriptor that
sets no flag on it and is always detached, so the host's descriptor is never
closed or changed (see ``_borrow``).

Elsewhere, or when ``/proc`` cannot be read: psutil; when psutil fails too,
only the socket objects leakguard tracks are asked (a degraded view, never an
exception).
"""

from __future__ import annotations

import _socket
import os
import socket
import sys
from typing import Any, NamedTuple

__all__ = ["KernelSocket", "StateCache", "TCP_STATES", "fd_usage", "format_address", "read_sockets"]

#: ``tcpi_state`` values (include/net/tcp_states.h) with the names netstat prints.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
_PSUTIL_STATES = {"NONE": None, "SYN_RECV": "SYN_RECV", "CLOSE": "CLOSE"}

_INET = (socket.AF_INET, socket.AF_INET6)
# The C-level attributes: socket.socket's properties convert to enums, which costs more than the syscall.
_family_of = _socket.socket.family.__get__
_type_of = _socket.socket.type.__get__
_STABLE = frozenset(("ESTABLISHED", "CLOSE_WAIT", "LISTEN"))  # addresses no longer change
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_IPPROTO_TCP = socket.IPPROTO_TCP
_SOL_SOCKET = socket.SOL_SOCKET
_SO_TYPE = socket.SO_TYPE
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
#: The F_SETSIG mark of leakguard's own epoll description (any valid signal number would do).
_EPOLL_MARK = 45
_IS_LINUX = sys.platform.startswith("linux")


# NamedTuple's functional form: in the class form, under ``from __future__ import annotations``,
# typing compiles every field's annotation string at import (more than this module's own cost).
class KernelSocket(
    NamedTuple(
        "KernelSocket",
        [
            ("fd", int | None),
            ("family", int),
            ("type", int),
            ("state", str | None),
            ("local", str | None),
            ("remote", str | None),
            ("obj", Any),  # the Python socket object when leakguard tracks it (default None)
        ],
    )
):
    """One socket descriptor of this process as the kernel sees it."""

    __slots__ = ()

    @property
    def is_tcp(self) -> bool:
        return self.family in _INET and self.type == socket.SOCK_STREAM


KernelSocket.__new__.__defaults__ = (None,)  # obj=None: what namedtuple(defaults=...) sets up
KernelSocket._field_defaults = {"obj": None}


#: What is remembered of a settled TCP socket: (local, remote, family, type).
Known = tuple[str | None, str | None, int, int]

_new_ks = tuple.__new__  # KernelSocket without NamedTuple's Python-level __new__, for the loop below
#: tcpi_state -> name, as a tuple indexed by state (for the compiled loop).
_STATE_NAMES = tuple(TCP_STATES.get(i) for i in range(max(TCP_STATES) + 1))


def _compiled_scan() -> Any:
    from . import registry  # its loader honours LEAKGUARD_PURE_PYTHON

    return getattr(registry._speedups, "scan", None) if _IS_LINUX else None


_scan = _compiled_scan()


def format_address(family: int, addr: Any) -> str | None:
    """``127.0.0.1:5432`` / ``[::1]:5432`` / a UNIX path, as ss prints them."""
    if addr is None:
        return None
    if family == socket.AF_INET6 and isinstance(addr, tuple):
        return f"[{addr[0]}]:{addr[1]}"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    if isinstance(addr, bytes):  # abstract UNIX socket
        return "@" + addr[1:].decode("utf-8", "replace") if addr[:1] == b"\0" else addr.decode("utf-8", "replace")
    return str(addr) or None


def _query(
    s: Any, family: int, kind: int, known: Known | None = None
) -> tuple[str | None, str | None, str | None]:
    state = None
    if family in _INET and kind == socket.SOCK_STREAM:
        state = TCP_STATES.get(s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0])
        if known is not None and state in _STABLE:
            return state, known[0], known[1]
    try:
        local = format_address(family, s.getsockname())
    except OSError:
        local = None
    try:
        remote = format_address(family, s.getpeername())
    except OSError:
        remote = None
    if family in _INET and local is not None and local.endswith(":0") and state == "CLOSE":
        local = None  # never bound
    return state, local, remote


def _read_one(fd: int, obj: Any, known: Known | None = None) -> KernelSocket | None:
    if obj is not None:
        try:
            family, kind = _family_of(obj), _type_of(obj)
            state, local, remote = _query(obj, family, kind, known)
            return KernelSocket(fd, family, kind, state, local, remote, obj)
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # closed meanwhile, or not a _socket.socket (gevent's): ask the raw fd below
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if not link.startswith("socket:["):
        return None
    try:
        raw = _borrow(fd)
    except (OSError, ValueError, OverflowError):
        return None
    try:
        family, kind = _family_of(raw), raw.getsockopt(_SOL_SOCKET, _SO_TYPE)
        state, local, remote = _query(raw, family, kind)
        return KernelSocket(fd, family, kind, state, local, remote, None)
    except OSError:
        return None
    finally:
        raw.detach()  # never close the host's descriptor


def _borrow(fd: int) -> Any:
    """A temporary ``_socket.socket`` on the host's *fd* that changes nothing about it (detach it after use).

    ``_socket.socket(fileno=fd)`` makes the descriptor non-blocking when the host
    has called ``socket.setdefaulttimeout()`` (CPython applies the default timeout
    to every new socket object), and ``O_NONBLOCK`` lives on the open file
    description: the host's blocking socket, and a forked parent's, would then
    raise ``BlockingIOError``.  A type carrying ``SOCK_NONBLOCK`` tells CPython
    the descriptor is non-blocking already, so it sets no flag.  The family comes
    from the kernel (``SO_DOMAIN``: ``getsockname`` needs it for the address
    size); the type the object reports is the one given, so callers ask
    ``SO_TYPE``.  Only getsockopt/getsockname/getpeername are called on it,
    which ignore the timeout.
    """
    if not _NONBLOCK:  # no way to make the object without touching the flags: ask nothing
        raise OSError("SOCK_NONBLOCK unavailable")
    return _socket.socket(-1, socket.SOCK_STREAM | _NONBLOCK, -1, fd)


def _list_fds() -> list[int]:
    # listdir's own directory descriptor shows up too; it is closed by now and
    # its readlink fails, so it drops out below.
    return [int(n) for n in os.listdir("/proc/self/fd")]


_fcntl_module: list[Any] = []


def _fcntl() -> Any:
    """The fcntl module (None where there is none); imported on first use, not at ``import leakguard``."""
    if not _fcntl_module:
        try:
            import fcntl
        except ImportError:  # Windows: no epoll either
            fcntl = None  # type: ignore[assignment]
        _fcntl_module.append(fcntl)
    return _fcntl_module[0]


class StateCache:
    """What one scan leaves for the next, so that a steady process costs the watcher little.

    Two savings, on the compiled path only:

    * **No syscall for a steady socket.**  Each tracked socket is registered
      once in an edge-triggered epoll set for EPOLLRDHUP (EPOLLHUP and
      EPOLLERR come along), and keeps its last state until epoll reports it
      (see ``_speedups.scan``).  The one change this cannot see is this
      process half-closing a socket itself (``shutdown(SHUT_WR)``): such a
      socket shows as ESTABLISHED rather than FIN_WAIT1/2 until the peer
      answers.  Every other change, CLOSE_WAIT above all, shows at the next
      scan.
    * **No /proc/self/fd listing while nothing untracked changed.**  Listing is
      the costliest part of a scan, and it is needed only to find the sockets
      leakguard did not see created.  After a full listing, the next scans ask
      only the tracked sockets plus the untracked ones found then, as long as
      the number of open descriptors (``stat("/proc/self/fd")``, Linux 6.2+)
      minus the tracked sockets is unchanged and every untracked socket is
      still the same (inode).  Every ``FULL_EVERY``-th scan lists again, which
      bounds how late a descriptor swap that keeps the counts equal (a file
      closed and an untracked socket opened) is seen.

    :func:`leakguard.snapshot` never uses one: it is always exact.
    """

    FULL_EVERY = 10

    __slots__ = ("ep", "ep_id", "memo", "n_other", "others", "scans")

    def __init__(self) -> None:
        self.ep: int | None = None  # our epoll descriptor, opened on first use (close() closes it)
        self.ep_id: tuple[int, int] = (0, 0)  # its (st_dev, st_ino) when opened
        self.memo: dict[int, Any] = {}
        self.others: dict[int, int] | None = None  # untracked socket fd -> inode, from the last full listing
        self.n_other = -1  # open descriptors other than tracked socket objects, at the last full listing
        self.scans = 0  # scans without a listing since the last full one
        _fcntl()  # imported now, in the installing thread: nothing is imported on the watcher's path

    def epoll_fd(self) -> int:
        """The epoll descriptor of the registrations, -1 if none can be had.

        Checked to be still ours first: a host that closed it (``os.closerange()``,
        daemon style) may have the number for one of its own files now, an epoll
        set among them, and the scan must not register sockets in the host's set.
        """
        fd = self.ep
        if fd is not None:
            if self._ours(fd):
                return fd
            self.ep, self.memo = None, {}  # the number is not ours any more: never touched again
        try:
            import select

            ep = select.epoll()  # close-on-exec
        except (ImportError, AttributeError, OSError):
            return -1
        try:
            # A bare descriptor of our own: a select.epoll object would close its number when
            # freed, whoever holds that number by then.  os.dup() is close-on-exec too.
            fd = os.dup(ep.fileno())
        except OSError:
            return -1
        finally:
            ep.close()
        try:
            fcntl = _fcntl()
            # A mark on the open file description, seen by F_GETSIG: it changes nothing for an
            # epoll set (which has no O_ASYNC), and tells ours from any other anon inode.
            fcntl.fcntl(fd, fcntl.F_SETSIG, _EPOLL_MARK)
            st = os.fstat(fd)
        except (AttributeError, OSError):  # no fcntl or F_SETSIG: no mark to tell ours by, so no epoll
            os.close(fd)
            return -1
        self.ep, self.ep_id = fd, (st.st_dev, st.st_ino)
        return fd

    def _ours(self, fd: int) -> bool:
        """Is *fd* still the epoll description this cache opened?"""
        try:
            fcntl = _fcntl()
            if fcntl.fcntl(fd, fcntl.F_GETSIG) != _EPOLL_MARK:
                return False
            st = os.fstat(fd)
        except (AttributeError, OSError):
            return False
        return (st.st_dev, st.st_ino) == self.ep_id

    def close(self) -> None:
        """Close the epoll descriptor (the registrations go with it), if it is still ours."""
        fd, self.ep = self.ep, None
        self.memo = {}
        if fd is None or not self._ours(fd):
            return  # the host closed it already; the number may be one of its own files now
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                return
        except OSError:
            pass  # no /proc: the mark and the inode decided
        try:
            os.close(fd)
        except OSError:
            pass

    def light(self, objects: dict[int, Any]) -> tuple[list[int], int] | None:
        """(descriptors to ask, open descriptors) when a full listing can be skipped, else None."""
        others = self.others
        if others is None or self.scans >= self.FULL_EVERY - 1:  # this scan would be the FULL_EVERY-th
            return None
        count = _fd_count()
        if count is None or count - len(objects) != self.n_other:
            return None
        fstat = os.fstat
        try:
            for fd, ino in others.items():
                if fstat(fd).st_ino != ino:
                    return None
        except OSError:
            return None
        self.scans += 1
        return sorted(objects.keys() | others.keys()), count

    def listed(self, socks: list[KernelSocket], objects: dict[int, Any], open_fds: int) -> None:
        """Remember a full listing's untracked sockets and descriptor count."""
        others: dict[int, int] = {}
        fstat = os.fstat
        for ks in socks:
            fd = ks[0]
            if fd is not None and fd not in objects:
                try:
                    others[fd] = fstat(fd).st_ino
                except OSError:
                    self.others = None  # closed meanwhile: list again next time
                    return
        self.others, self.n_other, self.scans = others, open_fds - len(objects), 0


def _fd_count() -> int | None:
    """Open descriptors from ``stat("/proc/self/fd")`` (Linux 6.2+ gives the count as its size), else None."""
    try:
        n = os.stat("/proc/self/fd").st_size
    except OSError:
        return None
    return n if n > 0 else None


def read_sockets(
    objects: dict[int, Any], known: dict[int, Known] | None = None, cache: StateCache | None = None
) -> tuple[list[KernelSocket], int | None]:
    """Every socket descriptor of this process with its kernel state, and the number of open descriptors.

    *objects* maps descriptors to Python socket objects leakguard holds for
    them; they are queried directly (no readlink needed).  *known* maps
    descriptors to (local, remote, family, type) seen earlier: once a TCP socket
    is ESTABLISHED, CLOSE_WAIT or LISTEN these are fixed, so only its state is
    asked again.  With *cache* (compiled path only), steady sockets cost no
    syscall and the listing is mostly skipped (see :class:`StateCache`).
    """
    known = known or {}
    if _scan is not None:
        try:
            light = cache.light(objects) if cache is not None else None
            items, slow, open_fds, memo = _scan(
                objects,
                known,
                KernelSocket,
                _STATE_NAMES,
                cache.memo if cache is not None else None,
                light[0] if light is not None else None,
                cache.epoll_fd() if cache is not None else -1,
            )
            if slow:
                get, kget = objects.get, known.get
                for i in slow:
                    fd = items[i]
                    obj = get(fd)
                    items[i] = _read_one(fd, obj, kget(fd) if obj is not None else None)
                items = [ks for ks in items if ks is not None]
        except Exception:  # /proc unreadable or odd: the Python path below decides what to fall back to
            pass
        else:
            if cache is not None:
                cache.memo = memo if memo is not None else {}
                if light is None:
                    cache.listed(items, objects, open_fds)
                else:
                    open_fds = light[1]
            return items, open_fds
    if _IS_LINUX and os.path.isdir("/proc/self/fd"):
        try:
            fds = _list_fds()
            out: list[KernelSocket] = []
            add = out.append
            get = objects.get
            kget = known.get
            states = TCP_STATES.get
            for fd in fds:
                obj = get(fd)
                k = kget(fd) if obj is not None else None
                if k is not None and obj is not None:
                    # The common case of a tracked TCP socket whose addresses are known: one syscall.
                    try:
                        state = states(obj.getsockopt(_IPPROTO_TCP, _TCP_INFO, 1)[0])
                    except OSError:
                        state = None
                    if state in _STABLE:
                        add(_new_ks(KernelSocket, (fd, k[2], k[3], state, k[0], k[1], obj)))
                        continue
                ks = _read_one(fd, obj, k)
                if ks is not None:
                    add(ks)
            return out, len(fds) - 1  # minus listdir's own descriptor
        except Exception:  # /proc unreadable or odd: degrade to psutil rather than fail the caller
            pass
    try:
        return _read_psutil(objects), None
    except Exception:  # psutil refused (permissions, an old version): what leakguard tracks itself
        return _read_objects(objects, known), None


def _read_objects(
    objects: dict[int, Any], known: dict[int, Known]
) -> list[KernelSocket]:
    """Last resort: ask only the socket objects leakguard tracks (untracked sockets are missed)."""
    out = []
    for fd, obj in objects.items():
        try:
            family, kind = _family_of(obj), _type_of(obj)
            state, local, remote = _query(obj, family, kind, known.get(fd))
        except Exception:
            continue
        out.append(KernelSocket(fd, family, kind, state, local, remote, obj))
    return out


def _read_psutil(objects: dict[int, Any]) -> list[KernelSocket]:
    import psutil

    proc = psutil.Process()
    getter = getattr(proc, "net_connections", None) or proc.connections
    out = []
    for c in getter(kind="all"):
        fd = c.fd if c.fd is not None and c.fd >= 0 else None
        state = c.status if c.type == socket.SOCK_STREAM and c.family in _INET else None
        state = _PSUTIL_STATES.get(state, state) if state else None
        local = format_address(c.family, tuple(c.laddr) if c.laddr else None)
        remote = format_address(c.family, tuple(c.raddr) if c.raddr else None)
        out.append(
            KernelSocket(fd, int(c.family), int(c.type), state, local, remote, objects.get(fd) if fd is not None else None)
        )
    return out


def fd_usage(open_fds: int | None = None) -> tuple[int, int]:
    """(open descriptors, RLIMIT_NOFILE soft limit; -1 when unlimited/unknown)."""
    limit = -1
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = -1 if soft == resource.RLIM_INFINITY else int(soft)
    except (ImportError, OSError, ValueError):
        pass
    if open_fds is not None:
        return open_fds, limit
    try:
        open_fds = len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own
    except OSError:
        try:
            import psutil

            p = psutil.Process()
            open_fds = p.num_fds() if hasattr(p, "num_fds") else p.num_handles()
        except Exception:
            open_fds = -1
    return open_fds, limit


def socket_inodes() -> dict[int, int]:
    """``{fd: inode}`` of every socket descriptor of this process now (``/proc/self/fd``; empty without it)."""
    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            try:
                out[int(name)] = int(link[8:-1])
            except ValueError:
                pass
    return out


def hex_addr4(text: str) -> str:
    """An address of ``/proc/net/tcp`` (``0100007F:1538``) as ss prints it (``127.0.0.1:5432``)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)[::-1]  # one little-endian 32-bit word
    return f"{socket.inet_ntop(socket.AF_INET, raw)}:{int(port, 16)}"


def hex_addr6(text: str) -> str:
    """An address of ``/proc/net/tcp6`` as ss prints it (``[::1]:5432``)."""
    host, port = text.split(":")
    b = bytes.fromhex(host)
    raw = b"".join(b[i : i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"
