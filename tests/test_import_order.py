"""Import order, as users meet it: every supported library imported before install(),
after it, and after it with uninstall() following, each in a fresh interpreter.

``import leakguard; leakguard.install(); import requests`` is the README's order
and what every ``leakguard run`` does; the suite's own process cannot test it
(pytest imported these libraries before any test ran).  Each case runs
``_import_order_child.py`` under ``-W error`` from a temporary directory (so the
installed package is imported, not the source tree) and checks that

- nothing is printed on stdout or stderr;
- the library's integrations are applied, and a real leak made through the
  library (a connection the test server or the real service then closes: the
  client end in CLOSE_WAIT) carries the integration's origin and target, the
  application's line, and its pool view where the library pools;
- after ``uninstall()``, every function, method and descriptor of the library
  (and of :mod:`socket`) is what a plain interpreter that never imported
  leakguard has, and no leakguard finder is left on ``sys.meta_path``.

Import order is per process, so each (library, order) pair gets its own
interpreter; the three processes of one library run side by side, and one plain
interpreter that imported every library answers for all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from leakguard.integrations import INTEGRATIONS

from .helpers import PYTHON_STRICT, require_service

CHILD = Path(__file__).with_name("_import_order_child.py")
ORDERS = ("before", "after", "uninstall")
PYTHON = PYTHON_STRICT


class Case(NamedTuple):
    applied: tuple[str, ...]  # integrations that must be applied once the entry module is imported
    origin: str
    pooled: bool  # the leak carries a pool view
    service: str | None = None
    needs: tuple[str, ...] = ()  # further modules the recipe needs


HTTP = ("http_client",)
CASES: dict[str, Case] = {
    "http.client": Case(HTTP, "http.client", False),
    "urllib.request": Case(HTTP, "http.client", False),
    "requests": Case(("requests", "urllib3", *HTTP), "requests", True),
    "requests.adapters": Case(("requests", "urllib3", *HTTP), "requests", True),
    "urllib3": Case(("urllib3", *HTTP), "urllib3", True),
    "urllib3.poolmanager": Case(("urllib3", *HTTP), "urllib3", True),
    "httpx": Case(("httpx",), "httpx", False),
    "aiohttp": Case(("aiohttp",), "aiohttp", False),
    # gevent's integration hooks gevent's socket class: its sockets are plain "socket" ones with a stack.
    "gevent": Case(("gevent",), "socket", False),
    # Task and thread boundaries, and loops that make sockets in C: the socket's line is the
    # application's (leakguard imports threading itself: "after install" is "before" there).
    "asyncio": Case(("asyncio",), "socket", False),
    "uvloop": Case(("uvloop", "asyncio"), "socket", False),
    "threading": Case(("threads",), "socket", False),
    "concurrent.futures.thread": Case(("executors",), "socket", False),
    "psycopg2": Case(("psycopg2",), "psycopg2", False, "postgres"),
    "psycopg2.pool": Case(("psycopg2", "psycopg2_pool"), "psycopg2", True, "postgres"),
    "psycopg": Case(("psycopg",), "psycopg", False, "postgres", ("psycopg2",)),
    "psycopg_pool": Case(("psycopg", "psycopg_pool"), "psycopg", True, "postgres", ("psycopg2",)),
    "asyncpg": Case(("asyncpg", "asyncpg_pool"), "asyncpg", False, "postgres", ("psycopg2",)),
    "pymysql": Case(("pymysql",), "pymysql", False, "mariadb"),
    "redis": Case(("redis",), "redis", True, "redis"),
    "redis.asyncio": Case(("redis",), "redis", True, "redis"),
    "sqlalchemy": Case(("sqlalchemy",), "sqlalchemy", True, "postgres", ("psycopg2",)),
    "sqlalchemy.ext.asyncio": Case(("sqlalchemy",), "sqlalchemy", True, "postgres", ("asyncpg", "greenlet", "psycopg2")),
}


def test_every_watched_module_has_a_case() -> None:
    """A new integration (or a new trigger module) gets its import-order case here too."""
    watched = {module for modules in INTEGRATIONS.values() for module in modules}
    assert watched <= set(CASES), watched - set(CASES)
    for case in CASES.values():
        assert set(case.applied) <= set(INTEGRATIONS)


def _environment() -> dict[str, str]:
    # The host's own settings only: none of the suite's LEAKGUARD_* options or path tweaks.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEAKGUARD_", "PYTEST_", "PYTHON"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(script: Path, entry: str, order: str, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{order}.json"
    proc = subprocess.run(
        [*PYTHON, str(script), entry, order, str(out)],
        cwd=workdir,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update(order=order, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
    return result


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The fingerprint of every library in an interpreter that never imported leakguard.

    One process for all: without leakguard, what a module holds does not depend on import order.
    """
    workdir = tmp_path_factory.mktemp("plain")
    script = workdir / CHILD.name
    shutil.copy(CHILD, script)
    result = _run(script, ",".join(sorted(CASES)), "plain", workdir)
    assert (result["rc"], result["stdout"], result["stderr"]) == (0, "", ""), result
    fingerprint: dict[str, str] = result["fingerprint"]
    return fingerprint


@pytest.mark.parametrize("entry", sorted(CASES))
def test_import_order(entry: str, tmp_path: Path, plain: dict[str, str]) -> None:
    case = CASES[entry]
    for module in (entry, *case.needs):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # the parent package is missing
            found = False
        if not found:
            pytest.skip(f"{module} is not installed (or not in this version of its library)")
    if case.service:
        require_service(case.service)
    script = tmp_path / CHILD.name  # run from a directory that is not the repository: the installed package
    shutil.copy(CHILD, script)
    with ThreadPoolExecutor(max_workers=len(ORDERS)) as pool:  # one process per order, side by side
        futures = {}
        for order in ORDERS:
            workdir = tmp_path / order
            workdir.mkdir()
            futures[order] = pool.submit(_run, script, entry, order, workdir)
        results = {order: f.result() for order, f in futures.items()}

    for order, result in results.items():
        assert (result["rc"], result["stdout"], result["stderr"]) == (0, "", ""), (order, result)

    for order in ("before", "after"):
        result = results[order]
        assert set(case.applied) <= set(result["applied"]), (order, result["applied"])
        assert result["leaks"], (order, "no leak seen", result)
        (leak,) = result["leaks"]
        assert leak["origin"] == case.origin, (order, leak)
        assert leak["pool"] is case.pooled, (order, leak)
        assert leak["site"] is not None and leak["site"].startswith(f"{script}:"), (order, leak)
        if case.origin != "socket":
            assert leak["target"], (order, leak)

    uninstalled = results["uninstall"]
    assert set(case.applied) <= set(uninstalled["applied"])
    assert uninstalled["left"] == []
    # The processes imported different parts of the library (the plain one imported every library;
    # an integration may import more of its own), and some libraries make classes per import: so
    # compare what both have, and look at what only this one has for anything of leakguard's.
    after: dict[str, str] = uninstalled["fingerprint"]
    changed = sorted(k for k in set(plain) & set(after) if plain[k] != after[k])
    assert changed == [], [(k, plain[k], after[k]) for k in changed[:10]]
    ours = sorted(k for k in set(after) - set(plain) if "leakguard" in after[k] or "wrapt" in after[k])
    assert ours == [], [(k, after[k]) for k in ours[:10]]


INTROSPECT = r"""
import importlib.machinery, importlib.resources, importlib.util, inspect, json, sys
if sys.argv[1] == "installed":
    import leakguard
    leakguard.install()
seen = []
for name in sys.argv[3].split(","):
    spec = importlib.util.find_spec(name)  # before the import: what a "is it installed?" check sees
    loader = spec.loader
    seen.append([name, "find_spec", type(loader).__module__, type(loader).__qualname__,
                 isinstance(loader, importlib.machinery.SourceFileLoader), spec.origin, spec.name,
                 loader.is_package(name), vars(loader) == vars(type(loader)(spec.name, spec.origin))])
    module = importlib.import_module(name)
    spec = module.__spec__
    seen.append([name, "imported", type(spec.loader).__qualname__, type(module.__loader__).__qualname__,
                 spec.loader is module.__loader__, importlib.util.find_spec(name) is spec,
                 inspect.getsource(module) == spec.loader.get_source(name),
                 sorted(p.name for p in importlib.resources.files(name.split(".")[0]).iterdir())[:5]])
if sys.argv[1] == "installed":
    from leakguard import _state
    seen.append(sorted(_state._state.applied))
with open(sys.argv[2], "w") as f:
    json.dump(seen, f)
"""


def test_loader_introspection_is_plain(tmp_path: Path) -> None:
    """find_spec's loader, __loader__, isinstance checks, resources and getsource: as without leakguard.

    A spec asked for by introspection is the real finders' own; the import itself still gets
    instrumented (the integrations apply).
    """
    names = [n for n in ("http.client", "requests", "psycopg2.pool", "redis") if importlib.util.find_spec(n.split(".")[0])]
    script = tmp_path / "introspect.py"
    script.write_text(INTROSPECT)
    seen = {}
    for mode in ("plain", "installed"):
        out = tmp_path / f"{mode}.json"
        proc = subprocess.run(
            [*PYTHON, str(script), mode, str(out), ",".join(names)],
            cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=60,
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
        seen[mode] = json.loads(out.read_text())
    applied = seen["installed"].pop()
    assert seen["installed"] == seen["plain"]
    assert {"http_client"} <= set(applied), applied


def test_behind_a_delegating_finder(tmp_path: Path) -> None:
    """wrapt's post-import hooks (New Relic, ddtrace, ...) put a finder in front of ours that asks
    ``importlib.util.find_spec`` again: the import is still instrumented, and both hooks run."""
    script = tmp_path / "chained.py"
    script.write_text(
        "import sys, leakguard, wrapt\n"
        "leakguard.install()\n"
        "hits = []\n"
        "wrapt.register_post_import_hook(lambda m: hits.append(m.__name__), 'http.client')\n"
        "assert type(sys.meta_path[0]).__name__ == 'ImportHookFinder', sys.meta_path\n"
        "import http.client\n"
        "from leakguard import _state\n"
        "assert 'http_client' in _state._state.applied and hits == ['http.client'], (_state._state.applied, hits)\n"
        "assert type(http.client.__loader__).__name__ == 'SourceFileLoader', http.client.__loader__\n"
    )
    proc = subprocess.run(
        [*PYTHON, str(script)],
        cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
