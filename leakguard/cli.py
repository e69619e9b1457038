"""``leakguard`` command line: ``demo``, ``run -- CMD``, ``snapshot``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

from . import _config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leakguard", description="Find connection leaks and the line that opened them.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="leak a loopback connection into CLOSE_WAIT and show the report")
    run = sub.add_parser(
        "run",
        help="run a Python program with leakguard installed from its first line",
        usage="leakguard run [options] -- CMD [ARGS...]",
    )
    for name in _config.OPTIONS:
        run.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=f"sets LEAKGUARD_{name.upper()}")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run, after --")
    snap = sub.add_parser("snapshot", help="print this process's sockets (mostly useful under 'run')")
    snap.add_argument("--json", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("leakguard run: nothing to run; usage: leakguard run [options] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    for name in _config.OPTIONS:
        value = getattr(args, name)
        if value is not None:
            env[f"LEAKGUARD_{name.upper()}"] = value
    try:  # validate now: a bad value is a clear error here, not a crash in the child
        _config.parse({}, env)
    except ValueError as exc:
        print(f"leakguard run: {exc}", file=sys.stderr)
        return 2
    boot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")
    env["PYTHONPATH"] = os.pathsep.join([boot] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    exe = cmd[0]
    if shutil.which(exe, path=env.get("PATH")) is None and not os.path.exists(exe):
        print(f"leakguard run: command not found: {exe}", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(exe, cmd, env)  # the program replaces us: exit code and signals are its own
    return 0  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
