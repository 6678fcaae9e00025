"""A small event log for the FM tests: ToySource (tests/data) with its history in group "history"
and a learnable click signal (the label depends on uid and on whether iid appears in hist)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa

from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.source import DayRule
from loopfm.fm.config import AutoencoderConfig, FMConfig, ModelConfig, ParallelConfig, TrainConfig
from tests.data.test_prepare import ToySource


class HistorySource(ToySource):
    def info(self):
        info = super().info()
        info.features = [dataclasses.replace(f, group="history") if f.name == "hist" else f
                         for f in info.features]
        return info

    def chunks(self):
        for chunk in super().chunks():
            uid = chunk.column("uid").to_numpy()
            iid = chunk.column("iid").to_pylist()
            hist = chunk.column("hist").to_pylist()
            seen = np.array([i in h for i, h in zip(iid, hist)])
            rng = np.random.default_rng(len(uid))
            p = 1 / (1 + np.exp(-(1.5 * (uid % 2) - 0.75 + 1.5 * seen - 0.5)))
            label = (rng.random(len(uid)) < p).astype(np.int64)
            yield chunk.set_column(1, "label", pa.array(label))


def make_log(root: Path, n: int = 2400, days: int = 6) -> EventLog:
    prepare(HistorySource(n, days=DayRule("equal_count", days)), root, config_hash="toy", progress=False)
    return EventLog(root)


def tiny_config(**train) -> FMConfig:
    """A small DMIN: seconds per run on a 2-core CPU."""
    t = dict(train_days=[1, 2, 3, 4], eval_days=[5, 6], batch_size=64, eval_batch_size=256,
             log_every_steps=1)
    t.update(train)
    return FMConfig(
        model=ModelConfig(embedding_dim=8, dnn=[16, 8, 4], num_heads=2, head_dim=4, attention_mlp=[8],
                          position_dim=4),
        autoencoder=AutoencoderConfig(taps=["hidden0", "hidden1"], dim=8, prefixes=[2, 4, 8], hidden=[16]),
        parallel=ParallelConfig(sharding_types=["table_wise"], cpu_threads=1),
        train=TrainConfig(**t),
    )
