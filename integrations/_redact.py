"""Redaction: a connection's ``target`` without its secrets.

A ``target`` is stored in memory, printed in reports and shipped to log
pipelines, so it never carries a secret.  :func:`redact_url` keeps only
``scheme://host:port``; :func:`redact_dsn` keeps the database address and
user and replaces any password with ``***``.  Both return ``None`` rather
than raise or guess when the input makes no sense: a missing target is better
than a leaked credential.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["DEFAULT_PORTS", "http_target", "redact_dsn", "redact_url"]

#: Ports implied by a scheme when a URL or DSN names none.
DEFAULT_PORTS: dict[str, int] = {
    "http": 80,
    "https": 443,
    "ws": 80,
    "wss": 443,
    "postgresql": 5432,
    "postgres": 5432,
    "mysql": 3306,
    "mariadb": 3306,
    "redis": 6379,
    "rediss": 6379,
}




def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace")
    return str(value)


def _host(host: str) -> str:
    host = host.strip()
    if ":" in host and not host.startswith("["):
        return f"[{host}]"  # IPv6 literal
    return host


def http_target(scheme: Any, host: Any, port: Any = None) -> str | None:
    """``scheme://host:port`` from parts (str or bytes, as httpcore keeps them).

    The port defaults from the scheme; an IPv6 host is bracketed.
    """
    try:
        s = _text(scheme).lower() if scheme else "http"
        h = _text(host) if host else ""
        if not h:
            return None
        p = int(port) if port not in (None, "", b"") else DEFAULT_PORTS.get(s)
        return f"{s}://{_host(h)}:{p}" if p is not None else f"{s}://{_host(h)}"
    except Exception:
        return None


def redact_url(url: Any) -> str | None:
    """``https://api.example.com:443`` from any URL: no userinfo, path, query or fragment.

    Accepts ``str``, ``bytes`` or URL objects (urllib3 ``Url``, httpx ``URL``,
    yarl ``URL``) through ``str()``.  A URL without a scheme is taken as
    ``http``; the port defaults from the scheme.  Returns ``None`` for input
    it cannot read.
    """
    try:
        if url is None:
            return None
        text = _text(url).strip()
        if not text:
            return None
        if "://" not in text:
            text = "http://" + text.lstrip("/")
        parts = urlsplit(text)
        host = parts.hostname  # lower-cased, without userinfo or brackets
        if not host:
            return None
        try:
            port = parts.port
        except ValueError:  # a port that is not a number
            port = None
        return http_target(parts.scheme or "http", host, port)
    except Exception:
        return None


_PASSWORD_KEYS = ("password", "passwd", "pass", "pwd", "sslpassword")
_USER_KEYS = ("user", "username", "usr")
_DB_KEYS = ("dbname", "database", "db")
_HOST_KEYS = ("host", "hostaddr", "unix_socket", "unix_sock", "path")
_KV_RE = re.compile(r"""\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)""")


def _parse_kv(text: str) -> dict[str, str]:
    """libpq's ``key=value key2='quoted value'`` connection strings."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _KV_RE.match(text, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith("'") and value.endswith("'") and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[m.group(1).lower()] = value
        pos = m.end()
    return out


def _first(params: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = params.get(k)
        if v not in (None, ""):
            return v
    return None


def redact_dsn(
    dsn_or_kwargs: Any = None,
    scheme: str = "postgresql",
    default_port: int | None = None,
    **kwargs: Any,
) -> str | None:
    """``postgresql://app:***@host:5432/db`` from a DSN URL, a libpq string or connect kwargs.

    *dsn_or_kwargs* is a URL (``postgresql://app:secret@host/db?sslmode=require``),
    a libpq keyword string (``host=h user=app password=secret dbname=db``) or a
    mapping of connect() keyword arguments; extra *kwargs* are merged over it
    (as drivers do: ``connect(dsn, password=...)``).  Recognised keys: host /
    hostaddr / unix_socket, port, user / username, password / passwd, dbname /
    database / db.

    The result keeps scheme, user, host, port and database.  A password, when
    one was given anywhere, shows as ``***``; without one there is no ``:***``
    (``postgresql://postgres@127.0.0.1:5432/test``).  The query string and
    every other parameter are dropped.  *scheme* (``"postgresql"``,
    ``"mysql"``, ``"redis"``) applies when the input does not name one;
    *default_port* overrides the scheme's usual port.  Returns ``None`` for
    input it cannot read.
    """
    try:
        params: dict[str, Any] = {}
        url_scheme: str | None = None
        password = False
        source = dsn_or_kwargs
        if isinstance(source, Mapping):
            mapping = {str(k).lower(): v for k, v in source.items()}
            source = mapping.pop("dsn", None) or mapping.pop("conninfo", None)
            kwargs = {**mapping, **kwargs}
        if source is not None:
            text = _text(source).strip()
            if "://" in text:
                parts = urlsplit(text)
                url_scheme = parts.scheme.lower() or None
                netloc = parts.netloc
                if "@" not in netloc and "@" in text.partition("://")[2]:
                    # A password with an unescaped / ? or # cut the authority short:
                    # whatever we printed could be part of it.
                    return None
                userinfo, _, hostinfo = netloc.rpartition("@")
                if userinfo:
                    user, sep, pw = userinfo.partition(":")
                    if user:
                        params["user"] = unquote(user)
                    password = bool(sep)
                # Multi-host DSNs (h1:5432,h2:5433) keep every host; IPv6 stays bracketed.
                if hostinfo:
                    params["_hostinfo"] = unquote(hostinfo)
                path = parts.path.lstrip("/")
                if path:
                    params["dbname"] = unquote(path)
                for k, v in parse_qsl(parts.query, keep_blank_values=True):
                    k = k.lower()
                    if k in _PASSWORD_KEYS:
                        password = password or bool(v)
                    elif k in _HOST_KEYS + ("port",) + _USER_KEYS + _DB_KEYS:
                        params.setdefault(k, v)
            elif text:
                params.update(_parse_kv(text))
        params.update({str(k).lower(): v for k, v in kwargs.items()})

        if _first(params, _PASSWORD_KEYS) is not None:
            password = True
        s = (url_scheme or scheme or "postgresql").lower()
        if s == "postgres":
            s = "postgresql"
        user = _first(params, _USER_KEYS)
        db = _first(params, _DB_KEYS)
        port = default_port if default_port is not None else DEFAULT_PORTS.get(s)

        multi = params.get("_hostinfo")
        if multi is not None and _first(params, _HOST_KEYS) is None:
            addr = _hostinfo(multi, port)
        else:
            host = _first(params, _HOST_KEYS)
            p = params.get("port")
            addr = _addresses(_text(host) if host is not None else "localhost", p, port)

        auth = ""
        if user is not None:
            auth = _text(user) + (":***" if password else "") + "@"
        elif password:
            auth = ":***@"
        out = f"{s}://{auth}{addr}"
        if db is not None and db != "":
            out += f"/{_text(db)}"
        return out
    except Exception:
        return None


def _hostinfo(hostinfo: str, default: int | None) -> str:
    """``h1:5432,h2`` -> every host with its port."""
    out = []
    for item in hostinfo.split(","):
        item = item.strip()
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":") or None
            host = f"[{host}]"
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        else:
            host, port = item, None
        p = port or default
        out.append(f"{host or 'localhost'}:{p}" if p is not None else (host or "localhost"))
    return ",".join(out)


def _addresses(hosts: str, ports: Any, default: int | None) -> str:
    """libpq style ``host=h1,h2 port=5432,5433`` -> ``h1:5432,h2:5433``."""
    host_list = [h.strip() for h in hosts.split(",")] if hosts else ["localhost"]
    if ports in (None, ""):
        port_list: list[Any] = [default] * len(host_list)
    else:
        port_list = [p.strip() for p in _text(ports).split(",")]
        if len(port_list) == 1:
            port_list *= len(host_list)
    out = []
    for i, h in enumerate(host_list):
        p = port_list[i] if i < len(port_list) else default
        h = _host(h) if not h.startswith("/") else h  # a unix-socket directory stays readable
        out.append(f"{h}:{p}" if p not in (None, "") else h)
    return ",".join(out)
