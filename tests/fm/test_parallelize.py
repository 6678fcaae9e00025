"""The sharding plan is a function of the model, the config and the world size only: the same in
every process, whatever Python's string-hash order (TorchRec intersects the allowed sharding types
as sets, so two equal-cost types used to win at random: PYTHONHASHSEED 1 and 2 chose table-wise and
column-wise for the same quickstart FM)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAN = """
import json, torch
from torchrec.distributed.sharding_plan import get_default_sharders
from loopfm.fm.config import ParallelConfig
from loopfm.fm.features import FeatureLayout, select_features
from loopfm.fm.model import FoundationModel
from loopfm.fm.parallelize import build_planner, sharding_plan_to_json
from loopfm.data.eventlog import EventLog
from tests.fm.toy import tiny_config
cfg = tiny_config()
cfg.parallel = ParallelConfig(sharding_types=["table_wise", "column_wise"], cpu_threads=1)
log = EventLog({root!r})
layout = FeatureLayout.build(select_features(log.schema, cfg.model), cfg.model.sequence_group)
model = FoundationModel(layout, cfg.model, cfg.autoencoder)
plans = {{w: sharding_plan_to_json(build_planner(model, cfg.parallel, torch.device("cpu"), w).plan(
    model, get_default_sharders())) for w in (1, 2)}}
print(json.dumps(plans, sort_keys=True))
"""


def _plans(root: Path, hash_seed: int) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PLAN.format(root=str(root))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plan_is_the_same_under_any_string_hash_order(tmp_path):
    from tests.fm.toy import make_log

    make_log(tmp_path / "data", n=600)
    first, second = _plans(tmp_path / "data", 1), _plans(tmp_path / "data", 2)
    assert first == second
    types = {t["sharding_type"] for plan in first.values() for tables in plan.values() for t in tables.values()}
    assert types == {"table_wise"}  # the first configured type wins a cost tie
