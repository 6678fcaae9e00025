"""`loopfm plan`: TorchRec's sharding planner for the FM on a given topology, without training.

Builds the FM's tables on the meta device (no memory, so 1B-row tables plan on a laptop), asks
the same planner `loopfm.fm.parallelize` uses (`make_planner`: configured sharding types, fused
kernels) for a plan on ``world_size`` devices of ``device`` type, and reports per table its
sharding and shards, per rank the planned HBM / DDR and the planner's perf estimate (its cost
model, in ms per step: forward + backward compute and communication).

Table sizes: a prepared event log's schema (``--data RUN/data``) when given, else the vocabulary
sizes must come from ``rows`` (``--rows item_id=1e9``, by vocabulary name) or ``default_rows``;
``rows`` always wins, so a small run's layout can be planned at paper scale.
"""
from __future__ import annotations

import dataclasses

import torch

from loopfm.data.schema import Schema
from loopfm.fm.config import FMConfig
from loopfm.fm.features import FeatureLayout, select_features

GIB = 1 << 30


@dataclasses.dataclass(kw_only=True)
class PlanRequest:
    world_size: int
    device: str = "cuda"
    local_world_size: int = 8  # devices per host
    hbm_gb: float = 80.0  # per device
    ddr_gb: float = 512.0  # per host
    batch_size: int | None = None  # per-rank batch for the cost model; None = global batch / world

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {self.world_size}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.hbm_gb <= 0 or self.ddr_gb <= 0:
            raise ValueError("--hbm-gb and --ddr-gb must be > 0")


def planning_schema(schema: Schema, rows: dict[str, int], default_rows: int | None) -> Schema:
    """``schema`` with each table's ``vocab_size`` from ``rows`` > its own > ``default_rows``."""
    vocabs = {f.vocab_name for f in schema.features if f.vocab_name}
    unknown = sorted(set(rows) - vocabs)
    if unknown:
        raise ValueError(f"--rows names unknown vocabularies {unknown}; the data's are {sorted(vocabs)}")
    features, missing = [], []
    for f in schema.features:
        if f.vocab_name:
            size = rows.get(f.vocab_name) or f.vocab_size or default_rows
            if not size:
                missing.append(f.vocab_name)
                continue
            f = dataclasses.replace(f, vocab_size=int(size))
        features.append(f)
    if missing:
        raise ValueError(f"no size for the tables of vocabularies {sorted(set(missing))}: give --data RUN/data "
                         "(a prepared event log), --rows VOCAB=N or --default-rows N")
    return dataclasses.replace(schema, features=features)


def source_schema(data_cfg, seed: int) -> Schema:
    """The schema a source declares, before any data is read (vocab sizes unknown: 0)."""
    from loopfm.data.sources import build_source

    info = build_source(data_cfg, seed).info()
    return Schema(dataset=info.dataset, user_key=info.user_key, item_key=info.item_key,
                  num_days=info.days.num_days, features=list(info.features))


def plan_fm(fm: FMConfig, schema: Schema, req: PlanRequest) -> dict:
    """Plan the FM's tables (sized by ``schema``'s vocab sizes); returns the report as plain data."""
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.sharding_plan import get_default_sharders

    from loopfm.fm.model import FoundationModel
    from loopfm.fm.parallelize import make_planner, plan_summary_from

    layout = FeatureLayout.build(select_features(schema, fm.model), fm.model.sequence_group)
    model = FoundationModel(layout, fm.model, fm.autoencoder, device=torch.device("meta"))
    local = min(req.local_world_size, req.world_size)
    topology = Topology(world_size=req.world_size, local_world_size=local, compute_device=req.device,
                        hbm_cap=int(req.hbm_gb * GIB), ddr_cap=int(req.ddr_gb * GIB))
    batch = req.batch_size or max(1, fm.train.batch_size // req.world_size)
    planner = make_planner(model, fm.parallel, torch.device(req.device), topology, batch_size=batch)
    plan = planner.plan(model, get_default_sharders())
    options = planner._best_plan or []  # the chosen ShardingOptions (storage and perf per shard)
    ranks = {r: {"hbm": 0, "ddr": 0, "perf_ms": 0.0} for r in range(req.world_size)}
    tables = []
    for so in options:
        for shard in so.shards:
            r = ranks[shard.rank]
            r["hbm"] += shard.storage.hbm
            r["ddr"] += shard.storage.ddr
            r["perf_ms"] += shard.perf.total
        tables.append({"table": so.name, "rows": so.tensor.shape[0], "dim": so.tensor.shape[1],
                       "sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
                       "ranks": sorted({s.rank for s in so.shards}), "shards": len(so.shards),
                       "hbm": sum(s.storage.hbm for s in so.shards)})
    return {"world_size": req.world_size, "device": req.device, "local_world_size": local,
            "hbm_gb": req.hbm_gb, "ddr_gb": req.ddr_gb, "batch_per_rank": batch,
            "tables": sorted(tables, key=lambda t: t["table"]), "ranks": ranks,
            "plan": plan_summary_from(plan)}


def format_report(report: dict) -> str:
    """Markdown: tables (placement), then per-rank HBM / DDR / perf estimate."""
    lines = [f"plan for {report['world_size']} x {report['device']} ({report['local_world_size']} per host, "
             f"{report['hbm_gb']:g} GB HBM per device, {report['ddr_gb']:g} GB DDR per host), "
             f"{report['batch_per_rank']} examples per rank per step", "",
             "| table | rows | dim | sharding | kernel | shards | ranks | HBM |",
             "|---|---:|---:|---|---|---:|---|---:|"]
    for t in report["tables"]:
        lines.append(f"| {t['table']} | {t['rows']:,} | {t['dim']} | {t['sharding_type']} | {t['compute_kernel']} | "
                     f"{t['shards']} | {_ranks(t['ranks'])} | {t['hbm'] / GIB:,.2f} GiB |")
    ranks = report["ranks"]
    hbm = [r["hbm"] / GIB for r in ranks.values()]
    perf = [r["perf_ms"] for r in ranks.values()]
    # ranks with the same (rounded) figures share a row, so 64 ranks stay readable
    groups: dict[tuple[str, str, str], list[int]] = {}
    for rank, r in ranks.items():
        key = (f"{r['hbm'] / GIB:,.2f} GiB", f"{r['ddr'] / GIB:,.2f} GiB", f"{r['perf_ms']:,.3f} ms")
        groups.setdefault(key, []).append(int(rank))
    lines += ["", "| ranks | HBM each | DDR each | planner perf estimate each |", "|---|---:|---:|---:|"]
    for (h, d, perf_ms), members in sorted(groups.items(), key=lambda kv: kv[1][0]):
        lines.append(f"| {_ranks(members)} | {h} | {d} | {perf_ms} |")
    lines += ["", f"HBM per rank: min {min(hbm):,.2f} / max {max(hbm):,.2f} GiB of {report['hbm_gb']:g}; "
                  f"perf estimate per rank: min {min(perf):,.3f} / max {max(perf):,.3f} ms "
                  "(the slowest rank bounds the step)"]
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    """Sorted ranks as runs: 0-7,9,12-15."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(f"{a}-{b}" if b > a + 1 else (f"{a},{b}" if b > a else str(a)) for a, b in runs)
