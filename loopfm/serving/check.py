"""`loopfm serve-check`: replay a day's impressions through the server's scoring code and compare
with the offline predictions of the same run (RUN/vm/predictions.parquet).

Each impression becomes part of a request with the raw values of its VM-visible features (ids
mapped back through the bundle's vocabularies; an OOV id becomes a value no vocabulary holds), so
the whole path — vocabularies, the store read as of the impression's time, the code decoding,
the exported VM — is what is checked. Impressions of one user at one second form one request,
as a server would receive them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from loopfm.serving.scorer import Scorer

TOLERANCE = 1e-5


def serve_check(scorer: Scorer, run_dir: str | Path, day: int | None = None) -> dict:
    """{"rows", "max_abs_diff", "name", "day"} of the replay of ``day`` (default: the VM test day)."""
    from loopfm.data.eventlog import EventLog

    b = scorer.bundle
    run_dir = Path(run_dir)
    name = b.manifest["name"]
    day = int(day if day is not None else b.manifest["test_day"])
    preds = pq.read_table(run_dir / "vm" / "predictions.parquet", columns=["example_id", name])
    offline = dict(zip(preds.column("example_id").to_pylist(), preds.column(name).to_pylist()))
    log = EventLog(run_dir / "data")
    lay = b.layout
    wanted = sorted({*lay.categorical, *lay.numeric, *(n for n, _ in lay.bags), b.key_feature})
    t = log.read([day], ["example_id", "ts", *wanted])
    eids = t.column("example_id").to_numpy()
    missing = [int(e) for e in eids if int(e) not in offline]
    if missing:
        raise ValueError(f"{run_dir}/vm/predictions.parquet has no prediction for examples {missing[:5]} of "
                         f"day {day}: serve-check replays the VM test day ({b.manifest['test_day']})")
    raw = {}
    for f in wanted:
        col = t.column(f).to_pylist()
        feat = b.features.get(f)
        if feat is not None and feat["kind"] == "numeric":
            raw[f] = col
            continue
        vocab = b.vocab_of(f) if feat is not None else b.key_vocab
        inverse = vocab.raw_of()
        raw[f] = [[inverse[i] for i in v] for v in col] if feat is not None and feat["kind"] == "sequence" \
            else [inverse.get(i, None) for i in col]
    ts = t.column("ts").to_numpy()
    users = raw[b.key_feature] if b.key_feature == b.manifest["user_key"] else [None] * len(ts)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(ts)):
        groups.setdefault((int(ts[i]), users[i]), []).append(i)
    served = np.empty(len(ts), np.float64)
    for (when, user), rows in groups.items():
        items = [{f: raw[f][i] for f in wanted} for i in rows]
        out = scorer.score({"ts": when, "items": items})
        served[rows] = out["scores"]
    expected = np.array([offline[int(e)] for e in eids], np.float64)
    diff = np.abs(served - expected)
    return {"name": name, "day": day, "rows": int(len(ts)), "requests": len(groups),
            "max_abs_diff": float(diff.max()) if len(diff) else 0.0}
