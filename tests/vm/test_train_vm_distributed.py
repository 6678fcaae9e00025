"""train-vm under 2 processes: the runs are shared out by rank and merged by rank 0, and the output
equals the one-process output exactly (about 10 s: two spawned processes)."""
from __future__ import annotations

import json
import uuid

import pyarrow.parquet as pq

from loopfm.data.prepare import prepare
from loopfm.stages.train_vm import VMStageConfig, run_train_vm, vm_jobs
from loopfm.vm.model import VMModelConfig
from loopfm.vm.train import VMTrainConfig
from tests.data.test_prepare import ToySource


def _config() -> VMStageConfig:
    # 3 runs over 2 ranks: rank 0 trains runs 0 and 2, rank 1 run 1; dropout makes each run use the RNG
    return VMStageConfig(models=["fm", "deepfm", "dmin"], variants=["baseline"], train_days=[1, 2, 3],
                         test_day=4, model=VMModelConfig(embedding_dim=4, dnn=[8], dropout=0.2),
                         train=VMTrainConfig(batch_size=64, device="cpu"))


def _worker(run_dir, out_dir) -> None:
    run_train_vm(_config(), run_dir, out_dir, config_hash="h", progress=False)


def test_two_processes_give_the_predictions_of_one(tmp_path):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run = tmp_path / "run"
    prepare(ToySource(1200, seed=0), run / "data", config_hash="toy", progress=False)
    one = run_train_vm(_config(), run, tmp_path / "one", config_hash="h", progress=False)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=str(tmp_path / "rdzv"),
                          rdzv_configs={"store_type": "file"}, start_method="spawn", max_restarts=0,
                          monitor_interval=0.1)
    elastic_launch(config, entrypoint=_worker)(run, tmp_path / "two")
    a, b = pq.read_table(tmp_path / "one" / "predictions.parquet"), pq.read_table(tmp_path / "two" / "predictions.parquet")
    assert a.column_names == b.column_names == ["example_id", "label", "user_id"] + [j.name for j in vm_jobs(_config())]
    assert a.equals(b)
    runs_a = json.loads((tmp_path / "one" / "runs.json").read_text())
    runs_b = json.loads((tmp_path / "two" / "runs.json").read_text())
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # noqa: E731
    assert strip(runs_a) == strip(runs_b)
    two = json.loads((tmp_path / "two" / "_SUCCESS").read_text())

    def facts(manifest):  # runs.json holds each run's seconds, so only its size may differ
        files = {k: v for k, v in manifest["files"].items() if k != "runs.json"}
        return {**{k: v for k, v in manifest.items() if k not in ("created_unix", "files")}, "files": files}
    assert facts(two) == facts(one)
    for name in (n for n in one["files"] if n.startswith("models/")):  # the saved VMs, byte for byte
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not (tmp_path / "two.work").exists()  # the per-rank parts are cleaned up


def test_rank_outside_world_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="outside world size"):
        run_train_vm(_config(), tmp_path, tmp_path / "vm", config_hash="h", rank=2, world_size=2)


def test_each_rank_has_its_own_tensorboard_folder_and_stale_events_go(tmp_path):
    from loopfm.pipeline import vm_tensorboard_folder

    root = tmp_path / "tb" / "vm"
    assert vm_tensorboard_folder(tmp_path, 0, 1) == root  # one process: the folder itself
    (root / "rank-2").mkdir(parents=True)  # left by an earlier run on 3 processes
    (root / "rank-1").mkdir()
    (root / "events.out.tfevents.1").write_bytes(b"x")  # left by an earlier run on 1 process
    (root / ".rank-1.tmp-5-ab").mkdir()  # rank 1 of this run, already writing
    assert vm_tensorboard_folder(tmp_path, 1, 2) == root / "rank-1"
    assert (root / "events.out.tfevents.1").exists()  # only rank 0 cleans up
    assert vm_tensorboard_folder(tmp_path, 0, 2) == root / "rank-0"
    assert sorted(p.name for p in root.iterdir()) == [".rank-1.tmp-5-ab", "rank-1"]
