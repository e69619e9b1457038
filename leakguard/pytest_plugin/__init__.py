"""pytest plugin: the test that leaves a socket open fails, naming the line that opened it.

Off by default.  Turn it on with ``--leakguard``, the ini option ``leakguard = true``
or ``LEAKGUARD_PYTEST=1``.  Every setting is a command-line flag, an ini option and
an environment variable (flag wins over environment, environment over ini):

=====================  ======================  ===========================  =========================
flag                   ini                     environment                  meaning
=====================  ======================  ===========================  =========================
``--leakguard``        ``leakguard``           ``LEAKGUARD_PYTEST``         on/off (default off)
``--leakguard-mode``   ``leakguard_mode``      ``LEAKGUARD_PYTEST_MODE``    ``fail`` (default) / ``warn``
``--leakguard-gc``     ``leakguard_gc``        ``LEAKGUARD_PYTEST_GC``      sockets freed by the garbage
                                                                            collector: ``warn`` (default),
                                                                            ``fail``, ``off``
``--leakguard-grace``  ``leakguard_grace``     ``LEAKGUARD_PYTEST_GRACE``   seconds a closing socket gets
                                                                            (default 0.5)
``--leakguard-ignore`` ``leakguard_ignore``    ``LEAKGUARD_PYTEST_IGNORE``  globs of creation sites
                                                                            (``path.py:LINE``), peers
                                                                            (``host:port``) or targets
=====================  ======================  ===========================  =========================

Ignore globs from all three sources add up, each value split on commas and whitespace;
the summary names any glob that matched no socket.

How a socket is attributed:

- A socket opened during a test's setup, call or teardown and still open once that
  test's fixtures are torn down is the test's leak: the test fails (its teardown report
  carries the failure; the test counts once, as failed) with one paragraph per socket:
  state, origin, peer, age, creation site ``path/to/test_file.py:LINE``, then the stack
  from the application's outermost frame inwards.  Tests that already failed are not
  checked (what they left open is a consequence of the failure).
- Sockets opened while a class-, module-, package- or session-scoped fixture is set up
  belong to that fixture, and so do sockets opened later that are reachable from the
  fixture's value (a pooled connection of a session-wide ``requests.Session``) and
  connections accepted on a listening socket the fixture owns (an in-process server).
  They are judged when the fixture is torn down; a leak is an error at that teardown.
- Before anything is called leaked it gets a grace period: one ``gc.collect()`` and a
  bounded exponential back-off (goleak's retry), so code that is closing never fails.
  Tests that opened no socket pay one integer comparison; the kernel is read only for
  sockets finally judged leaked.
- Under pytest-xdist each worker checks its own tests; the controller prints the summary.
- A socket idle in a pool a module global keeps (``urllib3._DEFAULT_POOL``, a
  module-level ``requests.Session``) is nobody's leak: the summary names the pool once.
- A socket that was never closed but freed by the garbage collector (what
  ``ResourceWarning`` reports) is listed with its creation stack: a warning in the
  terminal summary by default, a failure with ``--leakguard-gc=fail``.

Escape hatches: ``@pytest.mark.no_leakguard`` skips a test's check;
``@pytest.mark.leakguard(allow=N)`` tolerates up to N sockets and
``@pytest.mark.leakguard(allow=["127.0.0.1:6379", "tests/conftest.py:*"])`` ignores the
matching ones (same globs as ``leakguard_ignore``).

The package, by job: :mod:`._settings` (flags, ini, environment), :mod:`._gcwatch`
(sockets freed by the garbage collector), :mod:`._ownership` (which fixture owns which
socket), :mod:`._checker` (attribution and judging, through :mod:`leakguard.judge`) and
:mod:`._terminal` (failure texts and the summary).  This module holds pytest's entry
points (``pytest11``).
"""

from __future__ import annotations

import pytest

from ._checker import Checker
from ._settings import Settings, addoption, load_settings, parse_globs, settings_key
from ._terminal import SUMMARY, Summary, register_findings

__all__ = ["Settings", "load_settings", "parse_globs", "settings_key"]


def pytest_addoption(parser: pytest.Parser) -> None:
    addoption(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leakguard(allow=N|[globs]): tolerate up to N leaked sockets, or ignore sockets whose creation "
        "site, peer or target matches a glob",
    )
    config.addinivalue_line("markers", "no_leakguard: do not check this test for leaked sockets")
    settings = load_settings(config)
    config.stash[settings_key] = settings
    if not settings.enabled:
        return
    config.pluginmanager.register(Summary(config, settings), SUMMARY)
    worker = hasattr(config, "workerinput")
    controller = not worker and getattr(config.option, "dist", "no") != "no"
    if controller:  # the xdist controller runs no tests; its workers check them
        register_findings(config)  # and send their reports here, any of them may carry findings
    else:
        config.pluginmanager.register(Checker(config, settings), "leakguard-checker")


def pytest_report_header(config: pytest.Config) -> str | None:
    settings = config.stash.get(settings_key, None)
    if settings is None or not settings.enabled:
        return None
    return settings.describe()
