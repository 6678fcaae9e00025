"""Serving latency and throughput: 1 user x 1, 100 and 1000 candidates, a sequence of L = 50 codes,
both timeline stores, in-process (`Scorer.score`) and over HTTP on loopback (`loopfm serve`);
plus the store's bytes per event against the 16-byte INT4 code.

Without ``--run`` it first makes a small run with the quickstart's shapes that matter here (the
VM: embedding 16, DNN [128, 64], DMIN encoder; codes: INT4, dim 32 = 16 bytes; L = 50) on few
rows and a small FM, then exports its kd+loopfm DeepFM and DMIN:

    python benchmarks/serve_bench.py                      # about a minute on 2 cores
    python benchmarks/serve_bench.py --run runs/quickstart --models dmin

The store is loaded with the run's timelines (bytes per event are measured on them); the
benchmark user's timeline is then topped up with 60 entries in the last hour (random codes of the
run's width) so every request reads a full L = 50 sequence. Candidates are items of the run's
vocabulary. Each request is timed end to end (in-process: parse -> store read -> VM; HTTP: JSON
encode, POST on a keep-alive connection, response decode). Loops are bounded by ``--requests``
and ``--seconds``. The in-process loop runs on one core (CPU affinity) with one torch thread; the
server is one process with one torch thread.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL_RUN = [
    "data.synthetic.rows=4000", "fm.model.embedding_dim=8", "fm.model.dnn=[32,16]", "fm.model.head_dim=8",
    "fm.model.attention_mlp=[16]", "fm.autoencoder.hidden=[32]", "fm.train.batch_size=256",
    "vm.models=[deepfm,dmin]", "vm.variants=[kd+loopfm]", "vm.seeds=1",
]
CANDIDATES = (1, 100, 1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(folder: Path) -> tuple[subprocess.Popen | None, str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    import redis

    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def _requests(scorer, n_candidates: int, now: int, user_raw) -> dict:
    b = scorer.bundle
    item_vocab = b.vocab_of(b.manifest["item_key"])
    items = list(item_vocab.ids)[:max(n_candidates, 1)]
    items = (items * (n_candidates // len(items) + 1))[:n_candidates]
    numeric = {f: 1.0 for f in b.layout.numeric}
    return {"user": user_raw, "ts": now, "items": [{b.manifest["item_key"]: v, **numeric} for v in items]}


def _stats(times: list[float], cpu_s: float) -> tuple[float, float, float, float]:
    """p50 ms, p99 ms, requests/s, CPU ms per request."""
    t = np.asarray(times) * 1000
    return (float(np.percentile(t, 50)), float(np.percentile(t, 99)), float(len(t) / (t.sum() / 1000)),
            1000 * cpu_s / len(t))


def _loop(call, max_requests: int, seconds: float, cpu=time.thread_time) -> tuple[list[float], float]:
    """Wall time of each call, and the CPU seconds ``cpu()`` advanced over all of them."""
    for _ in range(3):  # warm-up
        call()
    times, deadline, cpu0 = [], time.perf_counter() + seconds, cpu()
    while len(times) < max_requests and (len(times) < 20 or time.perf_counter() < deadline):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times, cpu() - cpu0


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _http(bundle: Path, url: str, requests: dict, max_requests: int, seconds: float) -> dict:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "loopfm.cli", "serve", str(bundle), "--store", url,
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/health")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
        out = {}
        for n, req in requests.items():
            body = json.dumps(req).encode()

            def call():
                conn.request("POST", "/score", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
                if resp.status != 200 or len(data["scores"]) != n:
                    raise RuntimeError(f"HTTP {resp.status}: {data}")
            out[n] = _stats(*_loop(call, max_requests, seconds, cpu=lambda: _process_cpu(server.pid)))
        return out
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="finished run folder (default: make a small one in a temp folder)")
    parser.add_argument("--models", default="deepfm,dmin")
    parser.add_argument("--variant", default="kd+loopfm")
    parser.add_argument("--requests", type=int, default=500, help="at most this many timed requests per row")
    parser.add_argument("--seconds", type=float, default=3.0, help="and at most about this long per row")
    args = parser.parse_args()

    import torch

    from loopfm.cli import main as cli
    from loopfm.serving import timelines
    from loopfm.serving.bundle import Bundle, export_bundle
    from loopfm.serving.scorer import Scorer
    from loopfm.serving.store import open_store

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    redis_proc, redis_url = _start_redis(tmp)
    try:
        run = Path(args.run) if args.run else tmp / "run"
        if not args.run:
            print("making a small run (quickstart shapes, few rows) ...", file=sys.stderr)
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the benchmark's table
                failed = cli(["run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(run), "--quiet",
                              *SMALL_RUN])
            if failed:
                raise SystemExit("the small run failed")
        urls = {"sqlite": f"sqlite:{tmp / 'timelines.db'}"}
        if redis_url:
            urls["redis"] = redis_url
        else:
            print("no redis-server: the Redis rows are skipped", file=sys.stderr)
        rows, sizes = [], []
        for backend, url in urls.items():
            store = open_store(url)
            facts = timelines.load(run, store)
            code_bytes = int(facts["code_bytes"])
            sizes.append((backend, store.nbytes() / max(facts["entries"], 1), code_bytes, facts["entries"]))
            for model in args.models.split(","):
                bundle = tmp / f"bundle-{model}"
                if not bundle.exists():
                    export_bundle(run, model, args.variant, 0, bundle)
                scorer = Scorer(Bundle(bundle), store)
                L = int(scorer.bundle.sequence["max_len"])
                user_vocab = scorer.bundle.key_vocab
                user_raw, user_id = next(iter(user_vocab.ids.items()))
                now = int(time.time())
                rng = np.random.default_rng(0)
                k = L + 10
                store.append(np.full(k, user_id), now - 60 * np.arange(k, 0, -1), 10**12 + np.arange(k),
                             rng.integers(0, 256, (k, code_bytes), dtype=np.uint8))
                reqs = {n: _requests(scorer, n, now, user_raw) for n in CANDIDATES}
                assert scorer.score(reqs[1])["sequence_length"] == L
                for n, req in reqs.items():
                    stats = _stats(*_loop(lambda: scorer.score(req), args.requests, args.seconds))
                    rows.append((model, backend, "in-process", n, L, *stats))
                for n, stats in _http(bundle, url, reqs, args.requests, args.seconds).items():
                    rows.append((model, backend, "HTTP", n, L, *stats))
            store.close()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nlatency per request, 1 user x N candidates (torch {torch.__version__}, 1 thread; "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end)")
    print("CPU ms: the scoring thread's (in-process) or the server process's (HTTP) CPU time per request")
    print("| model | store | path | candidates | L | p50 ms | p99 ms | requests/s | CPU ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for model, backend, path, n, L, p50, p99, rps, cpu in rows:
        print(f"| {model} | {backend} | {path} | {n} | {L} | {p50:.2f} | {p99:.2f} | {rps:.0f} | {cpu:.2f} |")
    print("\nstore size (the run's timelines)")
    print("| store | entries | bytes per event | INT4 code bytes | overhead x |")
    print("|---|---:|---:|---:|---:|")
    for backend, per_event, code_bytes, entries in sizes:
        print(f"| {backend} | {entries:,} | {per_event:.1f} | {code_bytes} | {per_event / code_bytes:.1f} |")


if __name__ == "__main__":
    main()
