"""The operator's dashboard: the token rules, tolerant state reading, and a real headless Chromium during a demo.

The browser test drives Debian's ``chromium`` through its ``chromedriver`` (Selenium); it fails, not skips, when
they are missing. Its screenshot lands in the demo's report directory: ``<run_dir>/report/dashboard.png``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedlite.dashboard.auth import AuthError, is_loopback
from fedlite.dashboard.server import start_dashboard
from fedlite.dashboard.state import DashboardState

TOKEN = "s3cret-token-for-the-dashboard-test"
ROUNDS = 8
CLIENTS = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _non_loopback_ip() -> str | None:
    """An address of this machine other than loopback (IPv4), if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, it only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if is_loopback(ip) or ip == "0.0.0.0" else ip


# ---------- security ----------


def test_refuses_non_loopback_without_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedlite.cli import main

    for host in filter(None, ["0.0.0.0", _non_loopback_ip()]):
        with pytest.raises(AuthError, match="without a token"):
            start_dashboard(tmp_path, host=host, port=0)
        assert main(["dashboard", "--state-dir", str(tmp_path), "--host", host, "--port", "0"]) == 2
        assert "refusing to listen" in capsys.readouterr().err


def test_token_required_beyond_loopback(tmp_path: Path) -> None:
    (tmp_path / "history.json").write_text("[]")
    with start_dashboard(tmp_path, host="0.0.0.0", port=0, token=TOKEN) as handle:
        targets = [f"http://127.0.0.1:{handle.port}"]
        ip = _non_loopback_ip()
        if ip:
            targets.append(f"http://{ip}:{handle.port}")
        for base in targets:
            for path in ("/", "/api/state", "/static/app.js", "/api/fleet"):
                assert _get(base + path)[0] == 401, f"{base}{path} answered without a token"
            status, _, body = _get(base + "/healthz")  # probes need no token; it tells nothing private
            assert status == 200 and json.loads(body) == {"status": "ok"}
            assert _get(base + "/api/state", {"Authorization": "Bearer wrong-token-of-some-length"})[0] == 401
            assert _get(base + "/api/state", {"Authorization": f"Basic {TOKEN}"})[0] == 401
            status, headers, body = _get(base + "/api/state", {"Authorization": f"Bearer {TOKEN}"})
            assert status == 200 and json.loads(body)["rounds"] == []
            assert "default-src 'none'" in headers["content-security-policy"]
            # ?token= once: a cookie, and a redirect that drops the token from the address
            status, headers, _ = _get(base + f"/?token={TOKEN}")
            assert status == 303 and headers["location"] == "/"
            cookie = headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
            assert _get(base + "/", {"Cookie": cookie.split(";")[0]})[0] == 200
            assert _get(base + "/api/state", {"Cookie": "fedlite_dashboard=wrong"})[0] == 401
            # read-only, even with the token
            assert _get(base + "/api/state", {"Authorization": f"Bearer {TOKEN}"}, method="POST")[0] == 405


def test_loopback_answers_only_loopback_host_names(tmp_path: Path) -> None:
    with start_dashboard(tmp_path, port=0) as handle:
        assert _get(handle.url + "api/state")[0] == 200
        assert _get(handle.url + "api/state", {"Host": f"localhost:{handle.port}"})[0] == 200
        assert _get(handle.url + "api/state", {"Host": "rebound.example.com"})[0] == 403  # DNS rebinding
        assert _get(handle.url + "api/state", method="DELETE")[0] == 405


def test_short_or_empty_token_is_refused(tmp_path: Path) -> None:
    from fedlite.dashboard.auth import load_token

    with pytest.raises(AuthError, match="too short"):
        load_token("abc", None)
    (tmp_path / "token").write_text("\n")
    with pytest.raises(AuthError, match="empty"):
        load_token(None, tmp_path / "token")
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert load_token(None, tmp_path / "token") == TOKEN


# ---------- state files ----------


def test_state_tolerates_missing_and_half_written_files(tmp_path: Path) -> None:
    state = DashboardState(tmp_path / "not-yet")
    snap = state.snapshot()
    assert snap["rounds"] == [] and snap["fleet"] is None and snap["registry"] is None and snap["latest"] is None
    state = DashboardState(tmp_path)
    record = {"round": 1, "status": "complete", "selected": 3, "accepted": 3, "bytes_up": 10, "bytes_down": 20,
              "accuracy": 0.5, "loss": float("nan"),
              "client_metrics": {c: {"eval_accuracy_before": a} for c, a in (("a", 0.2), ("b", 0.6), ("c", 1.0))}}
    (tmp_path / "history.json").write_text(json.dumps([record]))
    snap = state.snapshot()
    assert snap["rounds"][0]["loss"] is None  # NaN is not JSON the browser accepts
    assert snap["latest"]["client_accuracies"] == [0.2, 0.6, 1.0]  # derived without a kpis block
    assert snap["rounds"][0]["kpis"]["client_accuracy_mean"] == pytest.approx(0.6)
    (tmp_path / "history.json").write_text(json.dumps([record, {**record, "round": 2}])[:-30])  # half-written
    snap = state.snapshot()
    assert [r["round"] for r in snap["rounds"]] == [1] and snap["files"]["history"]["stale"]
    (tmp_path / "fleet.json").write_text("{")
    assert state.snapshot()["fleet"] is None


# ---------- the page, in a real browser, during a real demo ----------


def _browser() -> Any:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver_path) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"the dashboard browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                    "not found): apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the dashboard browser test needs selenium: pip install selenium (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='fedlite-chromium-')}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _full_page_png(browser: Any, width: int = 1400) -> bytes:
    """The whole page, not only the window: a viewport as tall as the page (Chrome DevTools Protocol)."""
    height = int(browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]) + 1
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        time.sleep(0.6)  # the charts follow the new viewport on their next frame
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return base64.b64decode(shot["data"])


def _wait(condition: Any, timeout: float, what: str, demo: subprocess.Popen | None = None, log: Path | None = None,
          poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if demo is not None and demo.poll() is not None and demo.returncode != 0:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"the demo stopped (exit {demo.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(poll)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _texts(browser: Any, selector: str, attribute: str | None = None) -> list[str]:
    """The text (or `attribute`) of every element matching `selector`, read in one script: the page re-renders its
    tables at each poll, so elements found one call earlier may be gone."""
    script = ("return [...document.querySelectorAll(arguments[0])]"
              ".map((e) => arguments[1] ? e.getAttribute(arguments[1]) : e.textContent);")
    return browser.execute_script(script, selector, attribute)


def _rows(browser: Any, selector: str, key: str) -> dict[str, dict[str, Any]]:
    """Each row matching `selector` by its `key` attribute: its liveness, class, first cell's opacity and each
    `td[data-field]`'s text, read in one script (rows found one call earlier may be gone at the next poll)."""
    script = ("return [...document.querySelectorAll(arguments[0])].map((r) => [r.getAttribute(arguments[1]), {"
              "liveness: r.getAttribute('data-liveness'), class: r.className,"
              "opacity: r.querySelector('td') ? parseFloat(getComputedStyle(r.querySelector('td')).opacity) : null,"
              "cells: Object.fromEntries([...r.querySelectorAll('td[data-field]')]"
              ".map((td) => [td.getAttribute('data-field'), td.innerText]))}]);")
    return dict(browser.execute_script(script, selector, key))


def _history(state_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((state_dir / "history.json").read_text())
    except (OSError, ValueError):
        return []


def _dashboard_url(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        if line.startswith("dashboard: http://"):
            return line.split()[1]
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dashboard_in_chromium_during_a_demo(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    state_dir = run_dir / "aggregator"
    log = tmp_path / "demo.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "fedlite.cli", "demo", "--rounds", str(ROUNDS),
                                 "--clients", str(CLIENTS), "--run-dir", str(run_dir)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    browser = None
    handle = start_dashboard(state_dir, port=0)  # before the aggregator has written anything
    try:
        browser = _browser()
        browser.get(handle.url)
        body = browser.find_element("tag name", "body")

        # the demo starts its own dashboard and prints its URL; it answers while the rounds run
        demo_url = _wait(lambda: _dashboard_url(log), 90, "the demo to print its dashboard URL", demo, log)
        status, _, payload = _get(demo_url + "api/state")
        assert status == 200 and "rounds" in json.loads(payload)

        _wait(lambda: int(body.get_attribute("data-rounds") or 0) >= 1, 90, "the page to show rounds", demo, log)
        assert demo.poll() is None, "the demo ended before the page showed its rounds: not a live view"
        _wait(lambda: len(_history(state_dir)) >= ROUNDS, 90, f"{ROUNDS} rounds in history.json", demo, log)
        complete = sum(1 for r in _history(state_dir) if r.get("status") == "complete")
        _wait(lambda: int(body.get_attribute("data-complete") or 0) == complete, 15,
              f"the page to show {complete} complete rounds")
        _wait(lambda: int(browser.find_element("id", "fleet-table").get_attribute("data-devices") or 0) == CLIENTS,
              15, f"the fleet table to list {CLIENTS} devices")

        points = int(browser.find_element("id", "chart-accuracy").get_attribute("data-points"))
        assert points == complete, f"accuracy chart has {points} points for {complete} complete rounds"
        clients = {row.get_attribute("data-client")
                   for row in browser.find_elements("css selector", "#fleet-table tbody tr")}
        assert clients == {f"device-{i:02d}" for i in range(CLIENTS)}
        assert int(body.get_attribute("data-rounds")) == len(_history(state_dir))
        assert browser.find_element("id", "status-pill").text in ("live", "aggregator idle", "partial read",
                                                                  "run ended")
        assert browser.execute_script("return typeof Chart") == "function"  # the bundled chart library loaded
        labels = [e.text for e in browser.find_elements("css selector", ".tile-label")]
        assert "PRIVACY BUDGET ε" in labels, labels  # rendered in capitals, the symbol kept (not "E")

        # after the run: no device shown online, every exported version listed, each round's counts in its row
        _wait(lambda: demo.poll() is not None, 90, "the demo to finish", demo, log)
        assert demo.returncode == 0, log.read_text()[-3000:]
        pill = browser.find_element("id", "status-pill")
        _wait(lambda: pill.text == "run ended", 15, "the page to show the run has ended")
        liveness = _texts(browser, "#fleet-table tbody tr", "data-liveness")
        assert len(liveness) == CLIENTS and set(liveness) <= {"stale", "offline"}, liveness
        weights = _texts(browser, "#fleet-table td[data-field=weights_round]")
        assert any(w.startswith("round ") for w in weights), weights  # the global weights each device holds
        exported = [m for m in state_dir.glob("models/round-*/metrics.json") if m.parent.name != "round-00000"]
        assert len(exported) == ROUNDS  # round 0, the initial model, is not a version
        registry = browser.find_element("id", "registry")
        _wait(lambda: registry.get_attribute("data-versions") == str(ROUNDS), 15,
              f"the registry to list all {ROUNDS} exported versions")
        history = _history(state_dir)
        table = browser.find_element("id", "rounds")
        assert table.get_attribute("data-rounds") == str(len(history))
        for field in ("cut_off", "timed_out"):
            shown = [int(t) for t in _texts(browser, f"#rounds-table td[data-field={field}]")]
            assert shown == [r.get(field, 0) for r in reversed(history)], field
        # the demo's devices personalize: the tile shows the A/B of the last complete round's KPIs
        ab = next(r for r in reversed(history) if r["status"] == "complete")["kpis"]["personalization"]
        assert ab["devices"] >= 1
        gain = f"{'+' if ab['mean_gain'] >= 0 else ''}{100 * ab['mean_gain']:.1f} pt"
        _wait(lambda: browser.find_element("id", "t-personal").text == gain, 15, f"the personalization tile: {gain}")
        assert f"of {ab['devices']} devices" in browser.find_element("id", "t-personal-sub").text
        assert browser.find_element("id", "t-personal-sub2").text == f"worst decile {100 * ab['gain_p10']:.1f} pt"

        screenshot = run_dir / "report" / "dashboard.png"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = _full_page_png(browser)
        screenshot.write_bytes(shot)
        print(f"dashboard screenshot: {screenshot}")
        assert shot[:8] == PNG_SIGNATURE and len(shot) > 50_000
        page = body.text
        assert "run ended" in page and "CUT OFF" in page and "stale" in page

        errors = [entry for entry in browser.get_log("browser") if entry.get("level") == "SEVERE"]
        assert not errors, f"console errors: {errors}"
    finally:
        if browser is not None:
            browser.quit()
        handle.stop()
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # the demo stops every process it started
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()


# ---------- liveness, deployed models, the registry and the rounds table ----------


def _fleet(now: float, ended_at: float | None = None) -> dict[str, Any]:
    """Four devices as the aggregator writes them: fresh (v2 installed), training (a model the registry does not
    know), silent for longer than the 90 s window, and one that said offline."""
    device = {"stale": False, "eligible": True, "failed_gates": {}, "flags": [], "weights_run": "r1"}
    return {"updated_at": now - 1, "ended_at": ended_at, "federation": "f", "status_ttl_seconds": 90.0,
            "counts": {"known": 4, "online": 3, "eligible": 2, "training": 1}, "current_round": None, "devices": [
                {**device, "client_id": "fresh", "state": "online", "last_seen": now - 5, "deployed_model": "b" * 64,
                 "weights_round": 12},
                {**device, "client_id": "busy", "state": "training", "last_seen": now - 3,
                 "deployed_model": "f" * 64, "weights_round": 11},
                {**device, "client_id": "gone", "state": "online", "last_seen": now - 95, "deployed_model": "",
                 "weights_round": 3},
                {**device, "client_id": "quit", "state": "offline", "last_seen": now - 20, "deployed_model": "",
                 "weights_round": 0}]}


def _liveness(snap: dict[str, Any]) -> dict[str, str]:
    return {d["client_id"]: d["liveness"] for d in snap["fleet"]["devices"]}


def test_fleet_liveness_comes_from_last_seen_age_and_the_end_of_the_run(tmp_path: Path) -> None:
    now = time.time()
    (tmp_path / "fleet.json").write_text(json.dumps(_fleet(now)))
    snap = DashboardState(tmp_path).snapshot()
    assert _liveness(snap) == {"fresh": "online", "busy": "training", "gone": "stale", "quit": "offline"}
    assert snap["fleet"]["run_ended"] is None
    assert snap["fleet"]["counts"] == {"known": 4, "online": 2, "eligible": 1, "training": 1, "stale": 1,
                                       "offline": 1}
    (tmp_path / "fleet.json").write_text(json.dumps(_fleet(now, ended_at=now - 1)))  # the aggregator said so
    snap = DashboardState(tmp_path).snapshot()
    assert _liveness(snap) == {"fresh": "stale", "busy": "stale", "gone": "stale", "quit": "offline"}
    assert snap["fleet"]["counts"]["online"] == 0 and snap["fleet"]["run_ended"] == now - 1
    killed = {**_fleet(now), "updated_at": now - 400}  # an aggregator that was killed: no ended_at, no rewrite
    (tmp_path / "fleet.json").write_text(json.dumps(killed))
    assert set(_liveness(DashboardState(tmp_path).snapshot()).values()) == {"stale", "offline"}


def test_fleet_registry_and_rounds_render_in_chromium(tmp_path: Path) -> None:
    now = time.time()
    (tmp_path / "fleet.json").write_text(json.dumps(_fleet(now)))
    versions = [{"version": v, "round": v, "sha256": f"{v:02d}" * 32, "accuracy": 0.5 + v / 40,
                 "loss": 1.0 / v, "created_at": now - 600 + 10 * v, "path": f"/m/round-{v:05d}"} for v in range(1, 13)]
    versions[1]["sha256"] = "b" * 64  # v2: what "fresh" has installed
    (tmp_path / "registry.json").write_text(json.dumps({"versions": versions, "deployed": 2, "rollout": None,
                                                        "requests": []}))
    round_ = {"status": "complete", "selected": 5, "accepted": 3, "declined": 0, "aborted": 0, "accuracy": 0.8}
    history = [{**round_, "round": 1, "close_reason": "deadline", "timed_out": 2},  # written before cut_off
               {**round_, "round": 2, "close_reason": "quorum", "timed_out": 0, "cut_off": 2}]
    (tmp_path / "history.json").write_text(json.dumps(history))
    snap = DashboardState(tmp_path).snapshot()
    assert [(r["timed_out"], r["cut_off"]) for r in snap["rounds"]] == [(2, 0), (0, 2)]
    assert (snap["totals"]["timed_out"], snap["totals"]["cut_off"]) == (2, 2)
    browser = None
    with start_dashboard(tmp_path, port=0) as handle:
        try:
            browser = _browser()
            browser.get(handle.url)
            _wait(lambda: browser.find_element("id", "fleet-table").get_attribute("data-devices") == "4", 15,
                  "the fleet table")
            rows = _rows(browser, "#fleet-table tbody tr", "data-client")  # read at once: the page re-renders
            assert {cid: row["liveness"] for cid, row in rows.items()} == {
                "fresh": "online", "busy": "training", "gone": "stale", "quit": "offline"}
            greyed = {cid: "stale" in row["class"] for cid, row in rows.items()}
            assert greyed == {"fresh": False, "busy": False, "gone": True, "quit": True}
            assert rows["fresh"]["opacity"] == 1.0 and rows["gone"]["opacity"] < 1.0

            def cell(cid: str, field: str) -> str:
                return rows[cid]["cells"][field]

            assert [cell(c, "liveness") for c in ("fresh", "gone", "quit")] == ["online", "stale", "offline"]
            assert cell("fresh", "deployed_model") == "v2 bbbbbbbb"
            assert cell("busy", "deployed_model") == "ffffffff (not in the registry)"
            assert cell("gone", "deployed_model") == "none"
            assert [cell(c, "weights_round") for c in ("fresh", "quit")] == ["round 12", "–"]

            registry = browser.find_element("id", "registry")
            assert registry.get_attribute("data-versions") == "12"  # every version, not the latest few
            assert _texts(browser, "#registry tbody tr", "data-version") == [str(v) for v in range(12, 0, -1)]

            rounds = _rows(browser, "#rounds-table tbody tr", "data-round")
            fields = ("timed_out", "cut_off", "close_reason")
            assert [rounds["1"]["cells"][f] for f in fields] == ["2", "0", "deadline"]
            assert [rounds["2"]["cells"][f] for f in fields] == ["0", "2", "K updates"]
            headers = [th.text for th in browser.find_elements("css selector", "#rounds-table th")]
            assert "TIMED OUT" in headers and "CUT OFF" in headers, headers
            assert "2 timed out · 2 cut off" in browser.find_element("id", "participation-sub").text

            # the run ends: every device that did not say offline is stale, none online
            (tmp_path / "fleet.json").write_text(json.dumps(_fleet(time.time(), ended_at=time.time())))
            pill = browser.find_element("id", "status-pill")
            _wait(lambda: pill.text == "run ended", 15, "the page to show the run has ended")
            liveness = {cid: row["liveness"] for cid, row in _rows(browser, "#fleet-table tbody tr",
                                                                   "data-client").items()}
            assert liveness == {"fresh": "stale", "busy": "stale", "gone": "stale", "quit": "offline"}
            assert browser.find_element("id", "t-fleet").text == "0 / 4"

            shot = _full_page_png(browser)
            (tmp_path / "dashboard.png").write_bytes(shot)
            assert shot[:8] == PNG_SIGNATURE and len(shot) > 50_000, len(shot)
            page = browser.find_element("tag name", "body").text
            assert "run ended" in page and "v2 bbbbbbbb" in page and "CUT OFF" in page
            errors = [entry for entry in browser.get_log("browser") if entry.get("level") == "SEVERE"]
            assert not errors, f"console errors: {errors}"
        finally:
            if browser is not None:
                browser.quit()
