"""leakguard's integrations: one module per supported library.

Each module defines ``REQUIRES`` (a version gate such as ``"urllib3 >= 1.26, < 3"``),
``instrument()`` and ``uninstrument()``.  They are imported lazily, only when the
library they instrument is imported by the host program.

:data:`INTEGRATIONS` maps an integration's name (the module here, and the value
accepted by ``install(integrations=...)``) to the modules whose import triggers it.
"""

from __future__ import annotations

INTEGRATIONS: dict[str, tuple[str, ...]] = {
    "http_client": ("http.client",),
    "urllib3": ("urllib3",),
    "requests": ("requests",),
    "httpx": ("httpx",),
    "aiohttp": ("aiohttp",),
    "psycopg2": ("psycopg2",),
    "psycopg2_pool": ("psycopg2.pool",),
    "psycopg": ("psycopg",),
    "psycopg_pool": ("psycopg_pool",),
    "asyncpg": ("asyncpg",),
    "asyncpg_pool": ("asyncpg",),
    "pymysql": ("pymysql",),
    "redis": ("redis",),
    "sqlalchemy": ("sqlalchemy",),
    "gevent": ("gevent",),
    "asyncio": ("asyncio",),
    "uvloop": ("uvloop",),
    "threads": ("threading",),
    "executors": ("concurrent.futures.thread",),
}

__all__ = ["INTEGRATIONS"]
