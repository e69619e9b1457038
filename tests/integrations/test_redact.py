"""Targets never carry credentials: URL and DSN redaction (integrations/_redact.py)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leakguard.integrations._redact import http_target, redact_dsn, redact_url


class TestRedactUrl:
    """redact_url keeps scheme://host:port and drops userinfo, path, query and fragment."""

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("http://user:secret@127.0.0.1:8080/path?token=abc#frag", "http://127.0.0.1:8080"),
            ("https://API.Example.com/v1/items", "https://api.example.com:443"),
            ("http://example.com", "http://example.com:80"),
            ("https://[::1]:8443/x", "https://[::1]:8443"),
            ("http://[2001:db8::1]/", "http://[2001:db8::1]:80"),
            ("example.com:81/a?b=c", "http://example.com:81"),
            ("wss://u:p@socket.example.com/chat", "wss://socket.example.com:443"),
            (b"https://h.example/x?y=1", "https://h.example:443"),
        ],
    )
    def test_examples(self, url: object, expected: str) -> None:
        assert redact_url(url) == expected

    @pytest.mark.parametrize("url", [None, "", "   ", "http:///nohost"])
    def test_unreadable_input_gives_none(self, url: object) -> None:
        assert redact_url(url) is None

    def test_url_objects_of_the_http_libraries(self) -> None:
        import httpx
        import urllib3
        import yarl

        for url in (
            urllib3.util.parse_url("http://u:secret@h:1/p?token=abc"),
            httpx.URL("http://u:secret@h:1/p?token=abc"),
            yarl.URL("http://u:secret@h:1/p?token=abc"),
        ):
            assert redact_url(url) == "http://h:1"

    def test_http_target_from_parts(self) -> None:
        assert http_target(b"https", b"api.example.com", 443) == "https://api.example.com:443"
        assert http_target("http", "::1", None) == "http://[::1]:80"
        assert http_target("HTTP", "h", "8080") == "http://h:8080"
        assert http_target("http", "", 80) is None

    @settings(max_examples=200, deadline=None)
    @given(
        user=st.text(alphabet="abcdefghijklmnop0123456789_-.", min_size=1, max_size=12),
        secret=st.text(min_size=1, max_size=24),
        query=st.text(min_size=1, max_size=24),
    )
    def test_no_credential_or_query_survives(self, user: str, secret: str, query: str) -> None:
        s = "Zq9" + secret
        q = "Zq8" + query
        url = f"https://{user}:{quote(s, safe='')}@host.example:8443/p?token={quote(q, safe='')}#{quote(q)}"
        out = redact_url(url)
        assert out == "https://host.example:8443"


class TestRedactDsn:
    """redact_dsn keeps scheme, user, host, port and database; a password shows as ***."""

    @pytest.mark.parametrize(
        ("dsn", "expected"),
        [
            ("postgresql://app:secret@db:5432/orders", "postgresql://app:***@db:5432/orders"),
            ("postgres://app:secret@db/orders?sslmode=require", "postgresql://app:***@db:5432/orders"),
            ("postgresql://app@db/orders", "postgresql://app@db:5432/orders"),
            ("postgresql://app@db/orders?password=secret", "postgresql://app:***@db:5432/orders"),
            ("host=db user=app password=secret dbname=orders", "postgresql://app:***@db:5432/orders"),
            (
                "host=db port=6432 user=app password='s e c r e t' dbname=orders",
                "postgresql://app:***@db:6432/orders",
            ),
            ("postgresql://app:s@h1:5432,h2:5433/db", "postgresql://app:***@h1:5432,h2:5433/db"),
            ("host=h1,h2 port=5432,5433 dbname=db", "postgresql://h1:5432,h2:5433/db"),
            ("host=/var/run/postgresql dbname=db", "postgresql:///var/run/postgresql:5432/db"),
            ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db"),
            ("postgresql:///db?host=/tmp&user=me", "postgresql://me@/tmp:5432/db"),
            ("redis://:secret@localhost:6379/0", "redis://:***@localhost:6379/0"),
            ("mysql://root:secret@127.0.0.1/test", "mysql://root:***@127.0.0.1:3306/test"),
        ],
    )
    def test_strings(self, dsn: str, expected: str) -> None:
        assert redact_dsn(dsn) == expected

    def test_connect_kwargs(self) -> None:
        kw = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "password": "secret", "dbname": "test"}
        assert redact_dsn(kw) == "postgresql://postgres:***@127.0.0.1:5432/test"
        assert redact_dsn(**kw) == "postgresql://postgres:***@127.0.0.1:5432/test"
        mysql = {"host": "127.0.0.1", "user": "root", "passwd": "secret", "db": "test"}
        assert redact_dsn(mysql, scheme="mysql") == "mysql://root:***@127.0.0.1:3306/test"
        assert redact_dsn({"host": "h", "database": "d"}, scheme="redis") == "redis://h:6379/d"

    def test_kwargs_merge_over_the_dsn(self) -> None:
        assert redact_dsn("host=h dbname=d", user="app", password="secret") == "postgresql://app:***@h:5432/d"
        assert redact_dsn({"dsn": "host=h dbname=d", "password": "x"}) == "postgresql://:***@h:5432/d"

    def test_default_port_and_localhost(self) -> None:
        assert redact_dsn("dbname=d", default_port=6543) == "postgresql://localhost:6543/d"

    def test_ambiguous_url_gives_none_not_a_fragment_of_the_password(self) -> None:
        # An unescaped '?' in the password cuts the authority short.
        assert redact_dsn("postgresql://app:pa?ss@h/db") is None

    @settings(max_examples=200, deadline=None)
    @given(
        secret=st.text(min_size=1, max_size=24),
        form=st.sampled_from(["url", "kv", "kwargs", "query"]),
    )
    def test_no_password_survives(self, secret: str, form: str) -> None:
        s = "Zq9" + secret
        if form == "url":
            dsn: object = f"postgresql://app:{quote(s, safe='')}@db.example:5432/orders"
        elif form == "kv":
            escaped = s.replace("\\", "\\\\").replace("'", "\\'")
            dsn = f"host=db.example user=app password='{escaped}' dbname=orders"
        elif form == "query":
            dsn = f"postgresql://app@db.example/orders?password={quote(s, safe='')}"
        else:
            dsn = {"host": "db.example", "user": "app", "password": s, "dbname": "orders"}
        out = redact_dsn(dsn)
        assert out == "postgresql://app:***@db.example:5432/orders"
