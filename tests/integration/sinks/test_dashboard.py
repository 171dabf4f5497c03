"""The dashboard end to end: `chatpipe dev` fed by `chatpipe simulate`, the page rendered by Debian's headless
Chromium, and every figure it shows compared with the store's own rows (plain SQL on the SQLite file,
not the analytics code under test). Saves a screenshot (tmp dir, and CHATPIPE_DASHBOARD_SCREENSHOT if set).

Skips, saying why, when no `chromium` is installed (`scripts/test` installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections import Counter
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import pytest

from chatpipe import simulate, verify
from tests.support.dev import running_dev

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=20000",
)  # fmt: skip
FAILURES = ("undelivered", "rejected", "failed", "error")
MESSAGES = 400
SCREENSHOT_ENV = "CHATPIPE_DASHBOARD_SCREENSHOT"
API_KEY = "dashboard-test-key"  # the read API of the dev stack wants it (CHATPIPE_API_KEYS)


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """simulate and verify run in this process: the stack's settings (PII hash key) are the defaults."""
    for name in list(os.environ):
        if name.startswith("CHATPIPE_") and name != SCREENSHOT_ENV:
            monkeypatch.delenv(name)


class Elements(HTMLParser):
    """Every start tag's attributes, and the text of the elements holding an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append({"tag": tag, **{k: v or "" for k, v in attrs}})

    def by_id(self, ident: str) -> dict[str, str]:
        found = [t for t in self.tags if t.get("id") == ident]
        assert len(found) == 1, f"{ident}: {len(found)} elements"
        return found[0]

    def value(self, ident: str) -> float:
        return float(self.by_id(ident)["data-value"])

    def rows(self, key: str, value: str) -> dict[str, int]:
        return {t[key]: int(t[value]) for t in self.tags if key in t and value in t}


def chromium(url: str, user_dir: Path, *extra: str) -> str:
    done = subprocess.run(
        [CHROMIUM or "chromium", *FLAGS, f"--user-data-dir={user_dir}", *extra, url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def render(url: str, user_dir: Path) -> Elements:
    page = Elements()
    page.feed(chromium(url, user_dir, "--dump-dom"))
    main = page.by_id("app")
    assert main["data-state"] == "ready", f"the page did not render its data: {main}"
    return page


def query(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute(sql, params).fetchall()


def store_figures(db: Path, sub: str, channel: str | None = None) -> dict[str, object]:
    """What the dashboard must show for `sub` (optionally one current channel), from the raw tables."""
    where, params = "sub_account_id = ?", [sub]
    if channel:
        where += " AND current_channel = ?"
        params.append(channel)
    fails = ", ".join(f"'{s}'" for s in FAILURES)
    (m, delivered, read, failed, fell_back, final, deliver_n, read_n) = query(
        db,
        f"SELECT count(*), sum(state IN ('delivered', 'read')), sum(state = 'read'), sum(state IN ({fails})),"
        " sum(fell_back), sum(final), sum(first_sent_at IS NOT NULL AND delivered_at IS NOT NULL),"
        f" sum(delivered_at IS NOT NULL AND read_at IS NOT NULL) FROM messages WHERE {where}",
        *params,
    )[0]
    paths = dict(query(db, f"SELECT channel_path, count(*) FROM messages WHERE {where} GROUP BY 1", *params))
    errors = dict(
        query(
            db,
            "SELECT s.error_code, count(*) FROM message_steps s JOIN messages m ON m.umid = s.umid"
            f" WHERE m.{where.replace(' AND ', ' AND m.')} AND s.state IN ({fails})"
            " AND s.error_code IS NOT NULL GROUP BY 1",
            *params,
        )
    )
    return {
        "messages": m, "delivered": delivered, "read": read, "failed": failed, "fellBack": fell_back,
        "final": final, "deliverCount": deliver_n, "readCount": read_n,
        "paths": paths, "errors": {str(k): v for k, v in errors.items()},
    }  # fmt: skip


def shown_figures(page: Elements) -> dict[str, object]:
    top = dict(Counter(page.rows("data-code", "data-count")).most_common(10))
    return {
        "messages": page.value("kpi-messages"),
        "delivered": page.value("kpi-delivered"),
        "read": page.value("kpi-read"),
        "failed": page.value("kpi-failed"),
        "fellBack": page.value("kpi-fallback"),
        "final": page.value("funnel-final"),
        "deliverCount": page.value("lat-deliver-count"),
        "readCount": page.value("lat-read-count"),
        "paths": page.rows("data-path", "data-messages"),
        "errors": top,
    }


def top_errors(errors: dict[str, int], shown: dict[str, int]) -> dict[str, int]:
    """The store's error counts of the codes shown; and the shown ones must be the 10 most frequent."""
    if len(errors) > 10:
        tenth = sorted(errors.values(), reverse=True)[9]
        assert all(errors[c] >= tenth for c in shown)
    return {c: errors[c] for c in shown} if len(errors) > 10 else errors


async def test_the_page_and_its_own_files_are_served_and_nothing_else() -> None:
    """Offline by construction: this origin's files only, a CSP refusing any other, no URL to elsewhere."""
    from aiohttp.test_utils import TestClient, TestServer

    from chatpipe.runtime.config import Settings
    from sinks.api import create_app
    from sinks.connect import open_store
    from sinks.dashboard import FILES
    from sinks.rows import PiiPolicy

    store = open_store("sqlite:///:memory:", PiiPolicy())
    store.migrate()
    async with TestClient(TestServer(create_app(Settings(), store=store))) as client:
        r = await client.get("/dashboard")
        assert r.status == 200 and r.content_type == "text/html"
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        page = Elements()
        page.feed(await r.text())
        linked = [t.get("src") or t.get("href") for t in page.tags if t["tag"] in ("script", "link")]
        assert sorted(linked) == ["/dashboard/dashboard.css", "/dashboard/dashboard.js"]
        for name, content_type in FILES.items():
            r = await client.get(f"/dashboard/{name}")
            assert r.status == 200 and r.headers["Content-Type"] == content_type
            assert "://" not in await r.text(), f"{name} names another origin"
        for other in ("/dashboard/api.py", "/dashboard/..%2Fapi.py", "/dashboard/__init__.py"):
            assert (await client.get(other)).status == 404
    store.close()


@pytest.mark.timeout(600)
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test installs it)")
def test_dashboard_shows_the_stores_numbers_and_saves_a_screenshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = tmp_path / "truth.jsonl"
    db = tmp_path / ".chatpipe" / "chatpipe.db"
    with running_dev(tmp_path, CHATPIPE_API_KEYS=f"{API_KEY}:*") as (_proc, ingest, api):
        sent = simulate.main(
            ["--url", ingest, "--messages", str(MESSAGES), "--rate", "600", "--seed", "17",
             "--truth", str(truth), "--time-factor", "0.01", "--malformed-share", "0",
             "--inbound-share", "0.3"]
        )  # fmt: skip
        assert sent == 0, capsys.readouterr().out
        # the whole truth is in the store (and so are the aggregates, written in the same transactions)
        checked = verify.main(["--truth", str(truth), "--store", f"sqlite:///{db}", "--wait", "240"])
        assert checked == 0, capsys.readouterr().out

        (sub, _), *_ = query(db, "SELECT sub_account_id, count(*) FROM messages GROUP BY 1 ORDER BY 2 DESC")
        # the hours of the traffic, with a few empty ones before it
        first, last = (
            datetime.fromisoformat(t)
            for t in query(db, "SELECT min(first_event_at), max(first_event_at) FROM message_steps")[0]
        )
        since = first.replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
        until = last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
        iso = {k: v.isoformat().replace("+00:00", "Z") for k, v in (("since", since), ("until", until))}
        params = {"sub": sub, "range": "custom", **iso, "granularity": "hour", "refresh": "0"}
        url = f"{api}/dashboard?{urlencode(params)}"
        refused = Elements()  # the read API wants a key: without one the page says so and shows nothing
        refused.feed(chromium(url, tmp_path / "chromium", "--dump-dom"))
        assert refused.by_id("app")["data-state"] == "error"
        key = f"#{urlencode({'key': API_KEY})}"  # handed over in the fragment, kept in sessionStorage

        want = store_figures(db, sub)
        assert want["messages"] > 20 and want["fellBack"] and want["errors"]  # a dataset worth showing
        page = render(url + key, tmp_path / "chromium")
        got = shown_figures(page)
        want["errors"] = top_errors(want["errors"], got["errors"])  # type: ignore[arg-type]
        assert got == want
        inbound = query(db, "SELECT count(*) FROM inbound_messages WHERE sub_account_id = ?", sub)[0][0]
        assert page.value("kpi-inbound") == inbound
        assert page.by_id("range-line")  # units and range are printed

        # the default view (the last 24 hours up to the end of this one) holds the same traffic
        plain = urlencode({"sub": sub, "refresh": "0"})
        default = render(f"{api}/dashboard?{plain}{key}", tmp_path / "chromium")
        assert default.value("kpi-messages") == want["messages"]
        shown_since, shown_until = (
            datetime.fromisoformat(default.by_id("app")[k]) for k in ("data-since", "data-until")
        )
        assert shown_until - shown_since == timedelta(hours=24) and shown_until > last

        # a filter is applied: one channel
        channel = query(
            db, "SELECT current_channel FROM messages WHERE sub_account_id = ? GROUP BY 1 ORDER BY count(*)"
            " LIMIT 1", sub,
        )[0][0]  # fmt: skip
        filtered = render(f"{url}&{urlencode({'channel': channel})}{key}", tmp_path / "chromium")
        assert (
            filtered.value("kpi-messages") == store_figures(db, sub, channel)["messages"] < want["messages"]
        )

        shot = tmp_path / "dashboard.png"
        live = url.replace("refresh=0", "refresh=5") + key  # a few refreshes: the live rate is measured
        chromium(live, tmp_path / "chromium", f"--screenshot={shot}", "--window-size=1366,900")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
