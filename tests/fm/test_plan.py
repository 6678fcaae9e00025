"""`loopfm plan`: TorchRec's planner for CUDA topologies on a CPU-only machine (meta tables, so a
billion-row table costs nothing), table sizes from the schema or overrides, per-rank totals."""
from __future__ import annotations

import dataclasses

import pytest

from loopfm.fm.config import ParallelConfig
from loopfm.fm.plan import GIB, PlanRequest, format_report, plan_fm, planning_schema
from tests.fm.toy import make_log, tiny_config


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    return make_log(tmp_path_factory.mktemp("plan") / "log", n=300, days=4).schema


def test_plans_a_billion_row_table_on_a_cuda_topology_without_a_gpu(schema):
    cfg = dataclasses.replace(tiny_config(), parallel=ParallelConfig(sharding_types=["table_wise", "row_wise"]))
    sized = planning_schema(schema, {"iid": 1_000_000_000}, None)
    report = plan_fm(cfg, sized, PlanRequest(world_size=16, device="cuda", hbm_gb=80))
    tables = {t["table"]: t for t in report["tables"]}
    assert set(tables) == {"t_uid", "t_iid"}
    big = tables["t_iid"]
    assert big["rows"] == 1_000_000_000 and big["dim"] == 8
    # 32 GB of weights cannot sit on one 80 GB device with its optimizer state and the rest
    # comfortably: the planner spreads it row-wise over every rank
    assert big["sharding_type"] == "row_wise" and big["ranks"] == list(range(16))
    assert tables["t_uid"]["rows"] == schema.vocab_sizes()["uid"]
    per_rank = [r["hbm"] for r in report["ranks"].values()]
    assert sum(per_rank) == sum(t["hbm"] for t in tables.values())
    assert max(per_rank) < 80 * GIB and all(r["perf_ms"] > 0 for r in report["ranks"].values())
    text = format_report(report)
    assert "| t_iid | 1,000,000,000 | 8 | row_wise | fused | 16 | 0-15 |" in text
    assert text.count(" GiB | ") >= 2  # per-rank rows, ranks with equal figures grouped


def test_table_sizes_come_from_overrides_else_schema_else_default(schema):
    unsized = dataclasses.replace(schema, features=[dataclasses.replace(f, vocab_size=0) for f in schema.features])
    with pytest.raises(ValueError, match="no size for the tables of vocabularies"):
        planning_schema(unsized, {}, None)
    with pytest.raises(ValueError, match=r"unknown vocabularies \['nope'\]"):
        planning_schema(schema, {"nope": 5}, None)
    sized = planning_schema(unsized, {"uid": 7}, 1000)
    assert sized.vocab_sizes()["uid"] == 7 and sized.vocab_sizes()["iid"] == 1000


def test_cli_plan_prints_the_placement_and_rejects_bad_sizes(tmp_path, capsys):
    from loopfm.cli import main

    log = make_log(tmp_path / "data", n=300, days=4)
    args = ["plan", "fm.model.embedding_dim=8", "fm.train.batch_size=64", "--world-size", "2",
            "--device", "cuda", "--data", str(log.root), "--rows", "iid=2e6", "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plan for 2 x cuda" in out and "| t_iid | 2,000,000 | 8 |" in out
    assert (tmp_path / "p.json").exists()
    assert main([*args[:-2], "--rows", "iid=lots"]) == 2
    assert "expected VOCAB=N" in capsys.readouterr().err
    assert main([*args[:-2], "--rows", "nope=5"]) == 2
    assert "unknown vocabularies ['nope']" in capsys.readouterr().err
