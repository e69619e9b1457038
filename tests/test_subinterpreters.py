"""#14.2: a legacy sub-interpreter importing leakguard (and installing it) leaves the main
interpreter's compiled hook and records intact.

The compiled module keeps process-wide C state, so it loads in the main interpreter only;
a sub-interpreter gets ImportError from it and leakguard there takes the pure-Python path.
Each case runs in a fresh interpreter, on every Python 3.10-3.13 found here: the current
one against the installed package, the others against a copy of the package with the
extension compiled for that version (skipped with the reason when that is not possible).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import leakguard

PACKAGE = Path(leakguard.__file__).parent

PROGRAM = textwrap.dedent(
    """
    import socket, sys
    import leakguard
    from leakguard import registry, _sockets

    assert registry._speedups is not None, "the compiled module did not load in the main interpreter"
    leakguard.install(integrations="none")
    hook = vars(socket.socket)["__init__"]
    assert hook is not _sockets._hook, "not the compiled hook"

    SUB = '''
    import socket
    import leakguard
    from leakguard import registry
    assert registry._speedups is None, registry._speedups  # refused here: pure Python
    leakguard.install(integrations="none")
    s = socket.socket()
    assert registry.get(s.fileno()) is not None  # recorded in the sub-interpreter too
    s.close()
    leakguard.uninstall()
    leakguard.install(integrations="none")
    '''

    runs = []
    import _testcapi
    runs.append(("run_in_subinterp", lambda: _testcapi.run_in_subinterp(SUB)))
    try:
        import _interpreters as interp  # 3.13

        def legacy():
            i = interp.create("legacy")
            try:
                return interp.run_string(i, SUB)
            finally:
                interp.destroy(i)

        runs.append(("_interpreters legacy", legacy))
    except ImportError:
        try:
            import _xxsubinterpreters as interp  # 3.12

            def legacy():
                i = interp.create(isolated=False)
                try:
                    return interp.run_string(i, SUB)
                finally:
                    interp.destroy(i)

            runs.append(("_xxsubinterpreters legacy", legacy))
        except (ImportError, TypeError):
            pass
    for name, run in runs:
        got = run()
        assert got in (0, None), (name, got)
        # the main interpreter: same hook, every new socket recorded, nothing raises
        assert vars(socket.socket)["__init__"] is hook, name
        socks = [socket.socket() for _ in range(5)]
        assert all(registry.get(s.fileno()) is not None for s in socks), name
        for s in socks:
            s.close()
        a, b = socket.socketpair()
        assert registry.get(a.fileno()) is not None
        a.close(); b.close()
    print("OK", [name for name, _ in runs])
    """
)


def interpreters() -> list[str]:
    found = {f"{sys.version_info[0]}.{sys.version_info[1]}": sys.executable}
    for exe in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-3].*/bin/python3"))):
        minor = exe.split("/versions/")[1].split(".")
        found.setdefault(f"{minor[0]}.{minor[1]}", exe)
    return sorted(found, key=lambda v: int(v.split(".")[1]))


def build(exe: str, dest: Path) -> None:
    """A copy of the package with _speedups compiled for *exe* (skip when that cannot be done)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build leakguard._speedups for another Python")
    info = subprocess.run(
        [exe, "-c", "import sysconfig; print(sysconfig.get_paths()['include']); print(sysconfig.get_config_var('EXT_SUFFIX'))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if info.returncode != 0:
        pytest.skip(f"{exe} does not run: {info.stderr.strip()[-200:]}")
    include, suffix = info.stdout.split()
    if not os.path.exists(os.path.join(include, "Python.h")):
        pytest.skip(f"{exe} ships no Python.h")
    shutil.copytree(PACKAGE, dest / "leakguard", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    beside = PACKAGE.parent / "integrations"  # a source tree maps it to leakguard.integrations
    if beside.is_dir():
        shutil.copytree(beside, dest / "integrations", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [cc, "-O1", "-shared", "-fPIC", f"-I{include}", "-o", str(dest / "leakguard" / f"_speedups{suffix}"),
         str(PACKAGE / "_speedups.c")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("version", interpreters())
def test_sub_interpreter_leaves_main_intact(version: str, tmp_path: Path) -> None:
    if version == f"{sys.version_info[0]}.{sys.version_info[1]}":
        exe, env = sys.executable, dict(os.environ)
        if getattr(leakguard.registry, "_speedups", None) is None:
            pytest.skip("the compiled module is not built for this interpreter")
    else:
        exe = next(e for e in glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3")))
        build(exe, tmp_path)
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("LEAKGUARD_PURE_PYTHON", None)
    probe = subprocess.run([exe, "-c", "import _testcapi"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"Python {version} has no _testcapi (run_in_subinterp)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run(
        [exe, "-W", "error", "-c", PROGRAM], capture_output=True, text=True, timeout=120, cwd=run_dir, env=env
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_free_threading_is_declared() -> None:
    """The module states its GIL needs (Py_mod_gil) and refuses free-threaded builds itself."""
    source = (PACKAGE / "_speedups.c").read_text()
    assert "Py_mod_gil" in source and "Py_MOD_GIL_USED" in source
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert leakguard.registry._speedups is None
