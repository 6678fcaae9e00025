"""The serving loop on one tiny quickstart run (DeepFM and DMIN, kd+loopfm): export -> store load ->
serve-check against the offline test-day predictions, with the embedded SQLite store and a real
Redis server started here; `store append` of day K equals a load of days <= K; the HTTP server
answers a real request, rejects malformed ones with 400 and answers 503 when its store is down."""
from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loopfm.cli import main
from tests.tiny import TINY_MODELS

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.rows=3000", *TINY_MODELS, "vm.models=[deepfm,dmin]", "vm.variants=[kd+loopfm]",
        "vm.seeds=1"]
MODELS = ("deepfm", "dmin")
_REDIS_DB = itertools.count(1)  # a fresh Redis database number per test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(out), "--quiet", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def bundles(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    for model in MODELS:
        assert main(["export", str(tiny_run), "--model", model, "--variant", "kd+loopfm", "--seed", "0",
                     "--out", str(root / model)]) == 0
    return root


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port, in a temp dir, stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/install.sh VENV test installs it)")
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    """A fresh store URL of each backend (Redis: its own database number per test)."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'timelines.db'}"
    return f"{request.getfixturevalue('redis_server')}/{next(_REDIS_DB) % 16}"


def test_export_load_serve_check(tiny_run, bundles, store_url, capsys):
    assert main(["store", "load", str(tiny_run), "--store", store_url]) == 0
    for model in MODELS:
        assert main(["serve-check", str(bundles / model), "--store", store_url, "--run", str(tiny_run)]) == 0
        out = capsys.readouterr().out
        assert f"serve-check {model}/kd+loopfm/0 day 8" in out and "(ok)" in out, out


def test_serve_check_fails_on_a_store_missing_the_test_day(tiny_run, bundles, tmp_path, capsys):
    """Without day 8's own earlier events in the store, served sequences differ: exit 1."""
    url = f"sqlite:{tmp_path / 'old.db'}"
    assert main(["store", "load", str(tiny_run), "--store", url, "--through-day", "7"]) == 0
    assert main(["serve-check", str(bundles / "dmin"), "--store", url, "--run", str(tiny_run)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_append_of_day_k_equals_a_load_through_k(tiny_run, store_url, tmp_path, capsys):
    from loopfm.serving.store import open_store

    assert main(["store", "load", str(tiny_run), "--store", store_url, "--through-day", "7"]) == 0
    before = open_store(store_url).dump()
    assert main(["store", "append", str(tiny_run), "--store", store_url, "--day", "8"]) == 0
    appended = open_store(store_url)
    full_url = f"sqlite:{tmp_path / 'full.db'}"
    assert main(["store", "load", str(tiny_run), "--store", full_url, "--through-day", "8"]) == 0
    full = open_store(full_url)
    got, want = appended.dump(), full.dump()
    assert sum(map(len, want.values())) > sum(map(len, before.values())) > 0
    assert got == want
    assert appended.meta() == full.meta()
    assert main(["store", "append", str(tiny_run), "--store", store_url, "--day", "8"]) == 2  # already there
    assert "already holds days up to 8" in capsys.readouterr().err


def test_export_refuses_a_run_it_does_not_have(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--model", "dmin", "--variant", "baseline", "--out", str(tmp_path / "b")]) == 2
    assert "no trained VM 'dmin/baseline/0'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# -- HTTP ---------------------------------------------------------------------------------------
class _Server:
    def __init__(self, scorer) -> None:
        import uvicorn

        from loopfm.serving.server import make_app

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(make_app(scorer), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def call(self, path: str, body: bytes | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def _request_of_first_test_rows(run, bundle, n: int = 5) -> dict:
    """A real request: the first test-day user, at the time of their first impression, with raw values."""
    from loopfm.data.eventlog import EventLog

    log = EventLog(run / "data")
    t = log.read([8]).to_pylist()
    user_col, item_col = bundle.manifest["user_key"], bundle.manifest["item_key"]
    first = next(r for r in t if r[user_col] not in (0, bundle.key_vocab.oov_id))
    raw = {f: bundle.vocab_of(f).raw_of() for f in bundle.layout.categorical}
    rows = [r for r in t if r[user_col] == first[user_col]][:n]
    items = [{f: (raw[f][r[f]] if f in raw else r[f]) for f in (*bundle.layout.categorical, *bundle.layout.numeric)
              if f != user_col} for r in rows]
    items.append(dict(items[0], **{item_col: "an item no vocabulary holds"}))
    return {"user": raw[user_col][first[user_col]], "ts": first["ts"] + 86_400, "items": items}


def test_http_scores_a_request_and_rejects_malformed_ones(tiny_run, bundles, tmp_path):
    from loopfm.serving.bundle import Bundle
    from loopfm.serving.scorer import Scorer
    from loopfm.serving.store import open_store

    url = f"sqlite:{tmp_path / 'http.db'}"
    assert main(["store", "load", str(tiny_run), "--store", url]) == 0
    scorer = Scorer(Bundle(bundles / "dmin"), open_store(url))
    request = _request_of_first_test_rows(tiny_run, scorer.bundle)
    with _Server(scorer) as server:
        assert server.call("/health") == (200, {"status": "ok", "model": "dmin/kd+loopfm/0", "store": "ok"})
        status, body = server.call("/score", json.dumps(request).encode())
        assert status == 200, body
        assert len(body["scores"]) == len(request["items"]) and all(0 < s < 1 for s in body["scores"])
        assert body["sequence_length"] > 0
        assert body == scorer.score(request)  # the server computes what the in-process scorer does
        for bad, reason in [(b"{not json", "not JSON"), (b"[1, 2]", "JSON object"),
                            (json.dumps({"user": "1"}).encode(), "'items'"),
                            (json.dumps({**request, "ts": "noon"}).encode(), "'ts'"),
                            (json.dumps({**request, "items": [{"price": "cheap"}]}).encode(), "price")]:
            status, body = server.call("/score", bad)
            assert status == 400 and reason in body["error"], (bad, body)


def test_http_answers_503_when_the_store_is_down(bundles):
    from loopfm.serving.bundle import Bundle
    from loopfm.serving.scorer import Scorer
    from loopfm.serving.store import open_store

    scorer = Scorer(Bundle(bundles / "deepfm"), open_store(f"redis://127.0.0.1:{_free_port()}/0"))
    with _Server(scorer) as server:
        status, body = server.call("/health")
        assert status == 503 and body["store"] == "down"
        status, body = server.call("/score", json.dumps({"user": "1", "ts": 1, "items": [{"price": 1.0}]}).encode())
        assert status == 503 and "unavailable" in body["error"]
        assert server.call("/health")[0] == 503  # still up: the failure did not take it down
