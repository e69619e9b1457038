"""``leakguard attach PID``: run ``leakguard.snapshot()`` inside a live Python process, no restart.

How the code gets in
--------------------
* Python 3.14+ (both sides): ``sys.remote_exec(pid, script)`` (PEP 768); the
  target runs the script at its next safe point (its eval loop's check).
* 3.10-3.13: gdb in batch mode, as pyrasite did, but only at a point where the
  interpreter can take it.  gdb stops the process and looks for a thread that is
  **blocked in a system call with the GIL released** (``/proc/PID/task/TID/syscall``
  says it is in the kernel; ``PyGILState_Check()`` says it does not hold the GIL;
  its innermost frames are not in the GIL's own code).  Such a thread is inside
  ``Py_BEGIN_ALLOW_THREADS``: it holds no interpreter state and is not inside
  ``malloc``, so calling ``PyGILState_Ensure()``, then ``Py_CompileString()`` +
  ``PyEval_EvalCode()`` in a fresh namespace, then ``PyGILState_Release()`` on it
  is what that thread would do anyway when its system call returns: take the
  GIL, run Python, give it back.  On x86-64 each call sets only the general
  registers (return address: the executable's entry point, under a breakpoint)
  rather than through gdb's ``call``, which rewrites the whole extended (XSAVE)
  state and on CPUs gdb 13 does not know (AMX) fails half-way and kills the
  process; in a system call no vector register is live.  The code is compiled under the file name
  :data:`PAYLOAD_FILE` (inside leakguard's package; no such file): its frames on
  that thread's stack are leakguard's, so a diagnosis never names them as where
  the thread is now (``PyRun_SimpleString`` would run it as ``<string>`` in
  ``__main__``, which also kept its names there).  The main thread
  is preferred.  Afterwards the thread's registers are restored and its system
  call restarts (or returns EINTR, which Python retries: PEP 475): the program
  sees nothing.  When every thread is running Python code (or holds the GIL),
  none is safe: gdb detaches without touching anything and attach tries again
  after a short pause until its timeout, then refuses.  The interrupted
  alternative (pyrasite's: call in wherever the process happens to be, possibly
  inside ``malloc`` or holding the GIL's mutex) can deadlock or corrupt the
  target and is never used.

The injected code
-----------------
It imports leakguard from *this* installation (by file location, without
putting this installation on ``sys.path``; the compiled module is used only when
it was built for the target's interpreter, else the pure-Python path), takes a
snapshot (with the diagnosis: verdict, held_by, in_use), writes it as JSON to a
0600 file in a private 0700 directory, and leaves nothing behind: every module
it imported from this installation is removed from ``sys.modules`` again,
``sys.path`` is restored, no thread, hook, handler or descriptor stays (the
at-fork callbacks leakguard's modules register at import are intercepted for
the calling thread only, as they cannot be unregistered).  Standard-library
modules it needed stay imported, as after any import.  Any failure inside is
caught and returned as the error of the attach; the target sees no exception
and prints nothing.  ``--install`` instead leaves leakguard installed (and
``--report-interval`` starts its watcher): sockets the process opens from then
on carry creation stacks; the directories of wrapt/structlog from this
installation are then appended to the end of ``sys.path`` (the target's own
copies win).

How long the target is paused: see docs/LIVE.md (measured).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .procview import ProcessError

__all__ = ["AttachError", "attach", "format_result", "target_version"]

#: The interpreter versions gdb injection supports (3.14+ uses sys.remote_exec).
SUPPORTED = ((3, 10), (3, 11), (3, 12), (3, 13))


class AttachError(Exception):
    """Attaching was refused or failed; the message is one line for the user."""


# -- preflight --------------------------------------------------------------------------------------


def _status_uids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of *pid*."""
    uid = gid = -1
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def target_version(pid: int) -> tuple[int, int] | None:
    """The Python version (major, minor) of process *pid* from its executable and mappings, None if not Python."""
    import re

    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise AttachError(f"no such process: {pid}") from None
    except PermissionError:
        raise AttachError(f"permission denied: process {pid} belongs to another user (run as root or as its user)") from None
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except PermissionError:
        raise AttachError(f"permission denied reading /proc/{pid}/maps (run as root or as its user)") from None
    except OSError:
        maps = ""
    m = re.search(r"libpython(\d)\.(\d+)", maps) or re.search(r"python(\d)\.(\d+)", os.path.basename(exe))
    if m:
        return int(m.group(1)), int(m.group(2))
    if "python" not in os.path.basename(exe).lower():
        return None
    try:  # a python binary without the version in its name: ask it (that executable, not the target)
        out = subprocess.run(
            [exe, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, timeout=10
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _ptrace_allowed(pid: int) -> None:
    """Refuse with the reason when the kernel will not let us ptrace *pid*."""
    me = os.geteuid()
    try:
        uid, _ = _status_uids(pid)
    except FileNotFoundError:
        raise AttachError(f"no such process: {pid}") from None
    if me != 0 and uid != me:
        raise AttachError(f"permission denied: process {pid} runs as uid {uid}; attach as root or as that user")
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read().strip())
    except (OSError, ValueError):
        scope = 0
    if scope == 3:
        raise AttachError("ptrace not permitted: kernel.yama.ptrace_scope = 3 (no process may be traced until reboot)")
    if scope == 2 and me != 0:
        raise AttachError("ptrace not permitted: kernel.yama.ptrace_scope = 2 (only root, CAP_SYS_PTRACE, may attach)")
    if scope == 1 and me != 0 and not _is_ancestor(os.getpid(), pid):
        raise AttachError(
            "ptrace not permitted: kernel.yama.ptrace_scope = 1 (only a parent may attach); run as root, or "
            "sysctl kernel.yama.ptrace_scope=0"
        )


def _is_ancestor(me: int, pid: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == me:
            return True
    return False


class _Lock:
    """One attach per target pid at a time (an flock'ed file, released when the holder dies)."""

    def __init__(self, pid: int) -> None:
        import fcntl

        path = os.path.join(tempfile.gettempdir(), f"leakguard-attach-{pid}.lock")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise AttachError(f"another attach to process {pid} is in progress") from None

    def release(self) -> None:
        os.close(self.fd)  # the flock goes with it; the file stays (removing it would race the next locker)


# -- the code run inside the target ----------------------------------------------------------------

_PAYLOAD = r'''
def _leakguard_attach(result, package, extra, install, options):
    import sys, os
    out = {"ok": False}
    before = set(sys.modules)
    path = list(sys.path)
    real_fork_hook = getattr(os, "register_at_fork", None)
    me = None
    try:
        import _thread
        me = _thread.get_ident()
        if real_fork_hook is not None and not install:
            # leakguard's modules register at-fork callbacks at import; Python cannot unregister them.  Only
            # this thread's registrations are dropped (not installed, they would do nothing anyway).
            def register_at_fork(**kw):
                if _thread.get_ident() != me:
                    return real_fork_hook(**kw)
            os.register_at_fork = register_at_fork
        had = sys.modules.get("leakguard")
        if had is None:
            import importlib.util
            spec = importlib.util.spec_from_file_location(
                "leakguard", os.path.join(package, "__init__.py"), submodule_search_locations=[package])
            mod = importlib.util.module_from_spec(spec)
            sys.modules["leakguard"] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop("leakguard", None)
                raise
        import leakguard
        if install:
            sys.path.extend(p for p in extra if p not in sys.path)  # the target's own copies come first
            leakguard.install(**options)
        snap = leakguard.snapshot()
        out = snap.to_dict()
        out["text"] = snap.format()
        outlook = getattr(sys.modules.get("leakguard.fdlimit"), "outlook", None)  # an older leakguard: none
        projection = outlook(snap) if outlook is not None else None  # the watcher's, when one runs here
        out["fd_projection"] = projection.to_dict() if projection is not None else None
        out["ok"] = True
        out["attach"] = {
            "python": sys.version.split()[0],
            "leakguard": os.path.dirname(leakguard.__file__),
            "already_imported": had is not None,
            "installed": leakguard.installed(),
            "compiled": bool(getattr(sys.modules.get("leakguard.registry"), "_speedups", None)),
        }
    except BaseException as exc:
        import traceback
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        if real_fork_hook is not None:
            os.register_at_fork = real_fork_hook
        if not install and out.get("attach", {}).get("already_imported") is not True:
            sys.path[:] = path
            for name in set(sys.modules) - before:
                if name == "leakguard" or name.startswith("leakguard."):
                    del sys.modules[name]
                    continue
                f = getattr(sys.modules.get(name), "__file__", None) or ""
                if f and any(f.startswith(p + os.sep) for p in extra):
                    del sys.modules[name]  # a dependency from the attaching installation
    try:
        import json
        data = json.dumps(out, default=str).encode()
    except BaseException as exc:
        data = ('{"ok": false, "error": %r}' % f"result not serialisable: {exc}").encode()
    try:
        fd = os.open(result + ".part", os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(result + ".part", result)
    except BaseException:
        pass  # the attacher reports the missing result


try:
    if __import__("os").path.isdir(_ARGS[0].rsplit("/", 1)[0]):  # the attacher gave up: do nothing
        _leakguard_attach(*_ARGS)
except BaseException:
    pass
globals().clear()  # the function and its arguments: no reference cycle left for the collector
'''


#: The file name the injected code runs under: inside leakguard's package, so that its frames are
#: leakguard's (a diagnosis never takes them for the application's code, nor says a thread is "now at"
#: them); no such file exists.
PAYLOAD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__leakguard_attach__.py")


def _payload(result: str, install: bool, options: dict[str, Any]) -> str:
    package = os.path.dirname(os.path.abspath(__file__))
    extra = []
    for dep in ("wrapt", "structlog"):
        try:
            mod = __import__(dep)
            extra.append(os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__ or ""))))
        except ImportError:
            pass
    args = (result, package, sorted(set(extra)), install, options)
    return f"_ARGS = {args!r}\n" + _PAYLOAD


# -- gdb ---------------------------------------------------------------------------------------------

_GDB_SCRIPT = r'''
import gdb, json, os, time

PID, CODE, FILE, REPORT = {pid!r}, {code!r}, {file!r}, {report!r}
t0 = time.monotonic()
# Frames that mean "this thread is inside the GIL's own code": never call in there.
GIL_CODE = ("take_gil", "drop_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyEval_SaveThread",
            "PyGILState_Ensure", "PyGILState_Release", "_PyThreadState_Attach", "_PyThreadState_Detach")
out = {{"ok": False, "reason": "", "checked": []}}


def in_syscall(tid):
    try:
        with open("/proc/%d/task/%d/syscall" % (PID, tid)) as f:
            return f.read().split()[0] not in ("running", "-1")
    except (OSError, IndexError):
        return False


def frames(n=12):
    names = []
    try:
        f = gdb.newest_frame()
        while f is not None and len(names) < n:
            names.append(f.name() or "?")
            f = f.older()
    except gdb.error:
        pass
    return names


# Calls into the process write its general registers only, never its vector state: gdb's own `call`
# saves and restores the whole extended (XSAVE) state, which gdb 13 cannot write back on CPUs whose
# state it does not know (AMX: "Couldn't write extended state status: Bad address"), leaving the
# process with half-restored registers, and it dies.  Only a thread stopped inside a system call is
# ever called in (safe() below), where the ABI holds no vector register live, so the general registers,
# the flags and orig_rax (the system call to restart) are all there is to restore.
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "eflags", "rip")
ARGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
RET = []  # [address, breakpoint]: where a call returns, the executable's entry point, never run again
STOPS = []
FATAL = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGINT")


def _stopped(event):
    STOPS.append(event)


gdb.events.stop.connect(_stopped)


X86_64 = gdb.selected_inferior().architecture().name().startswith("i386:x86-64")


def call(fn, *args, signed32=False):
    """fn(*args) run in the selected thread; its return value (rax; an int when *signed32*)."""
    if not X86_64:  # the extended-state defect is x86's: elsewhere gdb's own call, which restores everything
        v = gdb.parse_and_eval("(%s)%s(%s)" % ("int" if signed32 else "long", fn, ", ".join(map(str, args))))
        return int(v)
    if not RET:
        entry = None
        for ln in gdb.execute("info files", to_string=True).splitlines():
            if "Entry point:" in ln:
                entry = int(ln.split()[-1], 16)
        if entry is None:
            raise RuntimeError("no entry point to return to")
        RET.extend([entry, gdb.Breakpoint("*%d" % entry, internal=True)])
    ret = RET[0]
    thread = gdb.selected_thread()
    gdb.execute("select-frame 0")
    frame = gdb.selected_frame()
    saved = [(r, int(frame.read_register(r))) for r in REGS]
    orig = int(gdb.parse_and_eval("$orig_rax"))
    addr = int(gdb.parse_and_eval("(long)&" + fn))
    sp = ((dict(saved)["rsp"] - 1024) & ~15) - 8  # past the red zone, 16-aligned at the callee's entry
    gdb.selected_inferior().write_memory(sp, ret.to_bytes(8, "little"))
    done = False
    try:
        for name, value in zip(ARGS, args):
            gdb.execute("set $%s = %d" % (name, value))
        gdb.execute("set $rsp = %d" % sp)
        gdb.execute("set $rip = %d" % addr)
        # No system call restart on the way in (the kernel would step rip back 2 bytes): rax and orig_rax
        # say "none"; the saved ones put back below let the interrupted call restart on the way out.
        gdb.execute("set $rax = 0")
        gdb.execute("set $orig_rax = -1")
        for _ in range(1000):
            del STOPS[:]
            gdb.execute("continue", to_string=True)
            here = gdb.selected_thread()
            if here is not None and here.ptid == thread.ptid:
                if int(gdb.selected_frame().read_register("rip")) == ret:
                    done = True
                    break
                fatal = [e.stop_signal for e in STOPS if isinstance(e, gdb.SignalEvent) and e.stop_signal in FATAL]
                if fatal:
                    # The call failed (or attach timed out): abandoned, as unwindonsignal would, and the
                    # signal is the call's own, not to be delivered once the registers are back.
                    gdb.execute("handle %s nopass" % fatal[-1], to_string=True)
                    break
            thread.switch()
        result = int(gdb.selected_frame().read_register("rax")) if done else None
    finally:
        thread.switch()
        gdb.execute("select-frame 0")
        for r, value in saved:
            gdb.execute("set $%s = %d" % (r, value))
        gdb.execute("set $orig_rax = %d" % orig)
    if result is None:
        raise RuntimeError("the call of %s did not return" % fn)
    result &= 0xFFFFFFFFFFFFFFFF
    if signed32:
        result &= 0xFFFFFFFF
        result -= (result >> 31) << 32
    return result


def safe(thread):
    thread.switch()
    tid = thread.ptid[1]
    if not in_syscall(tid):
        return "running"
    names = frames()
    if any(n in GIL_CODE for n in names):
        return "in the GIL's code (" + "/".join(n for n in names if n in GIL_CODE) + ")"
    gdb.execute("set scheduler-locking on")  # these two read thread-local state: nothing else may run
    try:
        if call("PyGILState_GetThisThreadState") == 0:
            return "not a Python thread"
        if call("PyGILState_Check", signed32=True) != 0:
            return "holds the GIL"
    finally:
        gdb.execute("set scheduler-locking off")
    return ""


try:
    # Only the interpreter's own symbols are needed: loading every library's would keep the process
    # stopped longer (auto-solib-add is off on the command line).
    # libc for unwinding out of a system call (to see a thread waiting for the GIL in take_gil).
    for lib in ("libpython", "libc[.-]", "libpthread"):
        try:
            gdb.execute("sharedlibrary " + lib, to_string=True)
        except gdb.error:
            pass  # a static interpreter: its symbols are in the executable
    gdb.execute("set pagination off")
    gdb.execute("set confirm off")
    gdb.execute("set unwindonsignal on")
    if call("Py_IsInitialized", signed32=True) == 0:
        out["reason"] = "the interpreter is not initialised (starting or shutting down)"
        raise SystemExit
    threads = sorted(gdb.selected_inferior().threads(), key=lambda t: (t.ptid[1] != PID, t.ptid[1]))
    chosen = None
    for t in threads:
        why = safe(t)
        out["checked"].append([t.ptid[1], why or "safe"])
        if not why:
            chosen = t
            break
    if chosen is None:
        out["reason"] = "no thread at a safe point"
    else:
        chosen.switch()
        out["tid"] = chosen.ptid[1]
        code = CODE.encode() + b"\0"
        name = FILE.encode() + b"\0"
        buf = call("PyMem_RawMalloc", len(code) + len(name))
        if buf == 0:
            out["reason"] = "PyMem_RawMalloc failed"
        else:
            gdb.selected_inferior().write_memory(buf, code + name)
            t1 = time.monotonic()
            state = call("PyGILState_Ensure", signed32=True)
            # Compiled under leakguard's own file name (not PyRun_SimpleString's "<string>" in __main__):
            # its frames are leakguard's, never taken for the application's, and __main__ gains no name.
            co = call("Py_CompileString", buf, buf + len(code), 257)
            res = 0
            if co != 0:
                glob = call("PyDict_New")
                if glob != 0:
                    res = call("PyEval_EvalCode", co, glob, glob)
                    if res != 0:
                        call("Py_DecRef", res)
                    call("Py_DecRef", glob)
                call("Py_DecRef", co)
            if res == 0:
                call("PyErr_Clear")  # our own failure only: the thread had none pending
            call("PyGILState_Release", state & 0xFFFFFFFF)
            out["run_s"] = time.monotonic() - t1
            call("PyMem_RawFree", buf)
            out["ok"] = res != 0
            if res == 0:
                out["reason"] = "the injected code failed to " + ("run" if co else "compile")
except SystemExit:
    pass
except Exception as exc:
    out["reason"] = "%s: %s" % (type(exc).__name__, exc)
if RET:
    RET[1].delete()  # the return breakpoint's int3 out of the process before it runs alone again
out["stopped_s"] = time.monotonic() - t0
with open(REPORT, "w") as f:
    json.dump(out, f)
gdb.execute("detach")
'''


def _gdb_once(pid: int, tmp: str, code: str, timeout: float) -> dict[str, Any]:
    gdb = shutil.which("gdb")
    if gdb is None:
        raise AttachError("gdb is missing: install it (apt-get install gdb) to attach to Python 3.10-3.13")
    report = os.path.join(tmp, "gdb.json")
    try:
        os.unlink(report)
    except FileNotFoundError:
        pass
    script = os.path.join(tmp, "inject.py")
    with open(script, "w") as f:
        f.write(_GDB_SCRIPT.format(pid=pid, code=code, file=PAYLOAD_FILE, report=report))
    cmd = [
        gdb, "-nx", "-batch", "-q",
        "-iex", "set auto-load off",
        "-iex", "set debuginfod enabled off",
        "-iex", "set startup-with-shell off",
        "-iex", "set auto-solib-add off",
        "-p", str(pid),
        "-x", script,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT: gdb interrupts a call in progress, the script restores the thread's registers, detaches.
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AttachError(f"timed out after {timeout:.0f} s inside gdb; the call was interrupted and gdb detached")
    try:
        with open(report) as f:
            result: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        last = [ln for ln in (stderr or "").splitlines() if ln.strip()]
        if any("ptrace" in ln and ("not permitted" in ln or "Operation not permitted" in ln) for ln in last):
            raise AttachError("ptrace not permitted (a container without CAP_SYS_PTRACE, or a seccomp policy)") from None
        raise AttachError("gdb failed: " + (last[-1] if last else f"exit code {proc.returncode}")) from None
    return result


def _run_gdb(pid: int, tmp: str, code: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        began = time.monotonic()
        res = _gdb_once(pid, tmp, code, max(1.0, deadline - began))
        if res.get("ok") or res.get("reason") != "no thread at a safe point":
            res["tries"] = tries
            return res
        took = time.monotonic() - began
        if time.monotonic() + 0.2 + 2 * took >= deadline:  # another try would not finish in time
            checked = ", ".join(f"{tid}: {why}" for tid, why in res.get("checked", []))
            raise AttachError(
                f"no thread of process {pid} was at a safe point in {tries} tries (every thread was running "
                f"Python code or held the GIL: {checked}); nothing was run"
            )
        time.sleep(0.2)


def _run_remote_exec(pid: int, tmp: str, code: str, result: str, timeout: float) -> dict[str, Any]:
    script = os.path.join(tmp, "inject.py")
    with open(script, "w") as f:  # run under leakguard's file name, as through gdb (see PAYLOAD_FILE)
        f.write(f"exec(compile({code!r}, {PAYLOAD_FILE!r}, 'exec'), {{}})\n")
    os.chmod(script, 0o644)
    try:
        sys.remote_exec(pid, script)  # type: ignore[attr-defined]
    except (OSError, RuntimeError) as exc:
        raise AttachError(f"sys.remote_exec failed: {exc}") from None
    deadline = time.monotonic() + timeout
    while not os.path.exists(result):
        if time.monotonic() > deadline:
            raise AttachError(
                f"process {pid} did not run the code within {timeout:.0f} s (its threads are not executing Python; "
                "the code runs when one does and then does nothing)"
            )
        time.sleep(0.02)
    return {"ok": True, "method": "sys.remote_exec"}


# -- entry point -------------------------------------------------------------------------------------


def attach(
    pid: int,
    install: bool = False,
    report_interval: str | None = None,
    timeout: float = 30.0,
    sample_s: float = 0.0,
) -> dict[str, Any]:
    """Take a snapshot inside live process *pid*; returns its ``to_dict()`` plus ``text``, ``attach``
    and ``fd_projection`` (when the fd limit is reached; see :mod:`leakguard.fdlimit`).

    The projection is the target's own watcher's when one runs there (by creation site), else
    measured from outside between a reading *sample_s* seconds before the snapshot and the snapshot
    (by state and peer; None with *sample_s* 0).  Raises :class:`AttachError` with a one-line reason
    when refused.
    """
    if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
        raise AttachError(f"no such process: {pid}")
    if pid == os.getpid():
        raise AttachError("cannot attach to the attaching process itself (call leakguard.snapshot() instead)")
    options: dict[str, Any] = {}
    if report_interval is not None:
        if not install:
            raise AttachError("--report-interval needs --install (a watcher only runs where leakguard is installed)")
        from . import _config

        try:
            _config.OPTIONS["report_interval"]("report_interval", report_interval)
        except ValueError as exc:
            raise AttachError(f"--report-interval: {exc}") from None
        options["report_interval"] = report_interval
    _ptrace_allowed(pid)
    version = target_version(pid)
    if version is None:
        raise AttachError(f"process {pid} is not a Python process ({_exe_name(pid)})")
    remote_exec = version >= (3, 14) and hasattr(sys, "remote_exec")
    if not remote_exec and version not in SUPPORTED:
        raise AttachError(
            f"unsupported Python version {version[0]}.{version[1]} in process {pid}: attach supports 3.10-3.13 "
            "through gdb and 3.14+ through sys.remote_exec (from a Python 3.14+ leakguard)"
        )
    lock = _Lock(pid)
    tmp = tempfile.mkdtemp(prefix="leakguard-attach-")  # 0700
    started = time.monotonic()
    try:
        uid, gid = _status_uids(pid)
        if os.geteuid() == 0 and uid != 0:
            os.chown(tmp, uid, gid)  # the target writes its result here, as its own user
        result = os.path.join(tmp, "result.json")
        code = _payload(result, install, options)
        before = _outside_sample(pid, sample_s)
        if remote_exec:
            how = _run_remote_exec(pid, tmp, code, result, timeout)
        else:
            how = _run_gdb(pid, tmp, code, timeout)
            if not how.get("ok"):
                raise AttachError(f"could not run code in process {pid}: {how.get('reason') or 'unknown reason'}")
        try:
            with open(result) as f:
                data: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            raise AttachError(f"process {pid} ran the code but wrote no result") from None
        if not data.get("ok"):
            raise AttachError(f"leakguard failed inside process {pid}: {data.get('error')}")
        info = data.setdefault("attach", {})
        info["method"] = "sys.remote_exec" if remote_exec else "gdb"
        info["elapsed_s"] = round(time.monotonic() - started, 3)
        if not remote_exec:
            info["stopped_s"] = round(how.get("stopped_s", 0.0), 3)
            info["run_s"] = round(how.get("run_s", 0.0), 3)
            info["thread"] = how.get("tid")
            info["tries"] = how.get("tries")
            info["threads_checked"] = how.get("checked")  # [tid, why not safe | "safe"] in the order tried
        data.pop("ok", None)
        if data.get("fd_projection") is None and before is not None:
            data["fd_projection"] = _outside_projection(before, data)
        return data
    except ProcessError as exc:
        raise AttachError(str(exc)) from None
    except FileNotFoundError:
        raise AttachError(f"no such process: {pid} (it exited)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()


def _outside_sample(pid: int, sample_s: float) -> Any:
    """A reading of *pid*'s descriptors from outside, *sample_s* seconds before the snapshot (None: 0)."""
    if sample_s <= 0:
        return None
    from . import fdlimit, procview

    first = fdlimit.sample_of_dict(procview.read_process(pid), time.time())
    time.sleep(sample_s)
    return first


def _outside_projection(before: Any, data: dict[str, Any]) -> dict[str, Any] | None:
    from . import fdlimit

    p = fdlimit.project([before, fdlimit.sample_of_dict(data, data["taken_at"])], data["fds"]["limit"], by="peer")
    return p.to_dict() if p is not None else None


def _exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return "?"


def format_result(data: dict[str, Any]) -> str:
    """The report printed by ``leakguard attach``: the target's own rendering, then how the attach went."""
    info = data.get("attach", {})
    head = (
        f"attached to pid {data.get('pid')} (Python {info.get('python')}, via {info.get('method')}"
        + (f", thread {info.get('thread')}" if info.get("thread") else "")
        + (
            f"; process stopped {info['stopped_s']:.2f} s, leakguard ran {info['run_s']:.2f} s"
            if "stopped_s" in info
            else ""
        )
        + (", leakguard stays installed" if info.get("installed") else ", nothing left behind")
        + ")"
    )
    text = str(data.get("text", ""))
    p = data.get("fd_projection")
    if p and p["message"] not in text:  # measured from outside: the target's own report could not say it
        first, _, rest = text.partition("\n")
        text = f"{first}\n{p['message']}" + (f"\n{rest}" if rest else "")
    return head + "\n" + text
