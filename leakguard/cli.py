"""``leakguard`` command line: ``demo``, ``run -- CMD``, ``snapshot``, ``inspect``, ``attach``, ``doctor``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import _config

__all__ = ["main"]


#: ``leakguard run`` turns the watcher on unless told otherwise: nobody calls snapshot() in production.
RUN_DEFAULTS = {"report_interval": "60"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leakguard", description="Find connection leaks and the line that opened them.")
    p.add_argument("--version", action="store_true", help="print the version (and whether the speedups are compiled)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("demo", help="leak a loopback connection into CLOSE_WAIT and show the report")
    run = sub.add_parser(
        "run",
        help="run a Python program with leakguard installed from its first line",
        usage="leakguard run [options] -- CMD [ARGS...]",
        description=(
            "Run CMD (any command that starts Python: python app.py, gunicorn app:app, ...) with leakguard "
            "installed before the program's first line. Each option sets the LEAKGUARD_* variable named in its "
            "help; variables already set in the environment apply too, options win. The program replaces this "
            "process: its exit code and the signals sent to it are its own."
        ),
    )
    for opt in _config.TABLE:
        text = f"{opt.help} (default {RUN_DEFAULTS.get(opt.name, opt.shown.strip('`'))}) [{opt.env}]"
        run.add_argument(opt.flag, dest=opt.name, metavar="VALUE", help=text.replace("`", "").replace("%", "%%"))
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run, after --")
    snap = sub.add_parser("snapshot", help="print this process's sockets (mostly useful under 'run')")
    snap.add_argument("--json", action="store_true")
    _live_parsers(sub)
    return p


def _live_parsers(sub: Any) -> None:
    """The subcommands for a live process from outside (inspect, attach) and for this installation (doctor)."""
    ins = sub.add_parser(
        "inspect",
        help="a running process's sockets read from outside (/proc), nothing run inside it",
        description=(
            "Read the sockets of process PID from /proc (its descriptors, its network namespace's tables and its "
            "own RLIMIT_NOFILE) without running anything inside it: TCP sockets by state, CLOSE_WAIT by peer, "
            "listening sockets, descriptors against the limit. Needs root or the process's user."
        ),
    )
    ins.add_argument("pid", type=int)
    ins.add_argument("--json", action="store_true", help="print the snapshot().to_dict() shape")
    _sample_option(ins)
    att = sub.add_parser(
        "attach",
        help="run leakguard inside a live Python process (no restart) and print who holds its leaks",
        description=(
            "Run leakguard.snapshot() inside the live Python process PID (Python 3.14+: sys.remote_exec; 3.10-3.13: "
            "gdb) and print it with verdict / held_by / in_use for every leak. The process is paused only while "
            "the snapshot is taken (see docs/LIVE.md); nothing stays behind unless --install."
        ),
    )
    att.add_argument("pid", type=int)
    att.add_argument("--json", action="store_true", help="print the snapshot().to_dict() shape")
    att.add_argument(
        "--install",
        action="store_true",
        help="leave leakguard installed in the process: sockets it opens from now on carry creation stacks",
    )
    att.add_argument(
        "--report-interval", metavar="S", default=None, help="with --install: start the periodic watcher every S seconds"
    )
    att.add_argument("--timeout", metavar="S", type=float, default=30.0, help="give up after S seconds (default 30)")
    _sample_option(att)
    doc = sub.add_parser("doctor", help="what is active and why; the limits and kernel settings that matter")
    doc.add_argument("--json", action="store_true")


def _sample_option(parser: Any) -> None:
    parser.add_argument(
        "--sample",
        metavar="S",
        type=_seconds("--sample"),
        default=1.0,
        help="read the descriptors twice, S seconds apart, and say when RLIMIT_NOFILE is reached at that rate "
        "(default 1; a slow leak needs longer; 0: one reading)",
    )


def _seconds(option: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 3600.0:
            raise argparse.ArgumentTypeError(f"{option} takes seconds from 0 to 3600, not {text!r}")
        return value

    return parse


def _live(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from . import procview

        try:
            view = procview.read_sampled(args.pid, args.sample)
        except procview.ProcessError as exc:
            print(f"leakguard inspect: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(view, indent=2) if args.json else procview.format_view(view))
        return 0
    if args.command == "attach":
        from . import attach

        try:
            result = attach.attach(
                args.pid,
                install=args.install,
                report_interval=args.report_interval,
                timeout=args.timeout,
                sample_s=args.sample,
            )
        except attach.AttachError as exc:
            print(f"leakguard attach: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2) if args.json else attach.format_result(result))
        return 0
    from . import doctor

    report = doctor.check()
    print(json.dumps(report, indent=2) if args.json else doctor.format_report(report))
    return 0


def run_environment(options: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """The environment for ``run``: options as ``LEAKGUARD_*``, the bootstrap on PYTHONPATH.

    Raises ValueError naming the option (``--report-interval``) or variable at fault.
    """
    env = dict(environ)
    table = {o.name: o for o in _config.TABLE}
    for name, value in options.items():
        opt = table[name]
        try:
            opt.check(name, value)
        except ValueError as exc:
            raise ValueError(f"{opt.flag}: {exc}") from None
        env[opt.env] = value
    for name, value in RUN_DEFAULTS.items():
        env.setdefault(table[name].env, value)
    _config.parse({}, env)  # the variables the program will see: a bad one is an error here
    boot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")
    old = env.get("PYTHONPATH")
    # Keep the program's PYTHONPATH exactly (an empty entry means the current directory).
    env["PYTHONPATH"] = boot + (os.pathsep + old if old else "")
    return env


def _run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("leakguard run: nothing to run; usage: leakguard run [options] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    options = {name: getattr(args, name) for name in _config.OPTIONS if getattr(args, name) is not None}
    try:  # validate now: a bad value is a clear error here, not a crash in the program
        env = run_environment(options, dict(os.environ))
    except ValueError as exc:
        print(f"leakguard run: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    code, message = _exec(cmd, env)  # returns only when the command could not be run
    print(f"leakguard run: {cmd[0]}: {message}", file=sys.stderr)
    return code


def _exec(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Replace this process with *cmd* as ``sh -c`` would run it; (exit code, message) when it cannot.

    The shell's rules (POSIX, as dash does them): a name with a slash is run as
    it is, one without is looked up in ``PATH``; not found is 127, found but not
    runnable (a directory, no execute permission) 126 with the system's reason;
    a PATH search that finds nothing runnable is 127 with the reason of the
    first candidate that refused.  A file the kernel cannot execute because it
    has no ``#!`` line is run by ``/bin/sh``, as a shell and ``execvp`` do.
    """
    exe = cmd[0]
    if not exe:
        return 127, "not found"
    if "/" in exe:
        candidates = [exe]
    else:
        candidates = [os.path.join(d or ".", exe) for d in os.get_exec_path(env)]
    refused: OSError | None = None
    for path in candidates:
        try:
            os.execve(path, cmd, env)  # the program replaces us: exit code and signals are its own
        except OSError as exc:
            if exc.errno == errno.ENOEXEC:
                try:
                    os.execve("/bin/sh", ["sh", path, *cmd[1:]], env)
                except OSError as sh_exc:
                    exc = sh_exc
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            if len(candidates) == 1:
                return 126, exc.strerror or str(exc)
            refused = refused or exc
    if refused is not None:
        return 127, refused.strerror or str(refused)
    return 127, "not found"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import doctor

        print(doctor.version_line())
        return 0
    if args.command is None:
        parser.error("a command is required (demo, run, snapshot, inspect, attach, doctor)")
    if args.command in ("inspect", "attach", "doctor"):
        return _live(args)
    if args.command == "demo":
        from . import demo

        return demo.main()
    if args.command == "run":
        return _run(args)
    if args.command == "snapshot":
        import leakguard

        snap = leakguard.snapshot()
        print(json.dumps(snap.to_dict(), indent=2) if args.json else snap.format())
        return 0
    return 2  # pragma: no cover
