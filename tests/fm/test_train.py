"""Training: 2 processes == 1 process, stop-and-resume == uninterrupted (1 and 2 processes), the
exported model."""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest
import torch

from loopfm.fm.train import fm_config_from_dict, load_trained_fm, train_fm
from tests.fm.toy import make_log, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmtrain") / "data"
    make_log(root, n=2400, days=6)
    return root


def _losses(fm_dir):
    rows = [json.loads(line) for line in (fm_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _eval(fm_dir):
    return json.loads((fm_dir / "eval.json").read_text())


def _state(fm_dir):
    return torch.load(fm_dir / "model.pt", weights_only=True)


def _worker(data, out, cfg: dict, resume: bool = False) -> None:
    train_fm(fm_config_from_dict(cfg), data, out, seed=0, config_hash="t", resume=resume, progress=False)


def _launch(nproc, tmp_path, *args) -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=str(tmp_path / f"rdzv-{uuid.uuid4().hex}"),
                          rdzv_configs={"store_type": "file"}, start_method="spawn", max_restarts=0,
                          monitor_interval=0.1)
    elastic_launch(config, entrypoint=_worker)(*args)


def _fresh(fm_dir):
    return json.loads((fm_dir / "_SUCCESS").read_text())["eval_fresh"]


def test_two_processes_match_one_process_and_resume_exactly(data, tmp_path):
    # refresh_days: after days 1-4 the FM goes on over day 5 (fm/daily/day=5), also under 2 processes
    cfg = tiny_config(checkpoint_every_steps=3, refresh_days=[5])
    train_fm(cfg, data, tmp_path / "one" / "fm", seed=0, config_hash="t", progress=False)
    _launch(2, tmp_path, data, tmp_path / "two" / "fm", dataclasses.asdict(cfg))
    one, two = tmp_path / "one" / "fm", tmp_path / "two" / "fm"
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == 28 and l1.keys() == l2.keys()  # 4 days x 7 batches of 64, per-step losses
    assert [l1[k] for k in sorted(l1)] == pytest.approx([l2[k] for k in sorted(l2)], rel=1e-5, abs=1e-6)
    for day, m in _eval(one).items():
        assert _eval(two)[day]["rows"] == m["rows"]
        for k in ("auc", "logloss", "ne"):  # AUC moves in steps of 1/(positives x negatives) when two
            # nearly tied predictions swap under another summation order (seen: 1.3e-5)
            assert _eval(two)[day][k] == pytest.approx(m[k], abs=5e-5)
    s1, s2 = _state(one), _state(two)
    assert s1.keys() == s2.keys()
    for k in s1:  # Adam divides a near-zero gradient by its own RMS: summation-order noise in such
        # coordinates grows to ~lr-sized steps, so parameters match less tightly than the losses
        torch.testing.assert_close(s1[k], s2[k], atol=1e-3, rtol=1e-3, msg=k)
    assert json.loads((two / "_SUCCESS").read_text())["world_size"] == 2
    assert _fresh(two)["6"]["auc"] == pytest.approx(_fresh(one)["6"]["auc"], abs=1e-5)
    d1, d2 = _state(one / "daily" / "day=5"), _state(two / "daily" / "day=5")
    for k in d1:
        torch.testing.assert_close(d1[k], d2[k], atol=1e-3, rtol=1e-3, msg=k)

    # Stopped after step 11 and resumed, 2 processes end exactly like the uninterrupted 2 processes.
    stopped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=11))
    _launch(2, tmp_path, data, tmp_path / "resumed" / "fm", dataclasses.asdict(stopped))
    assert not (tmp_path / "resumed" / "fm").exists()
    _launch(2, tmp_path, data, tmp_path / "resumed" / "fm", dataclasses.asdict(cfg), True)
    assert _eval(tmp_path / "resumed" / "fm") == _eval(two)
    s3 = _state(tmp_path / "resumed" / "fm")
    assert all(torch.equal(s2[k], s3[k]) for k in s2)
    d3 = _state(tmp_path / "resumed" / "fm" / "daily" / "day=5")  # the refresh is redone identically
    assert all(torch.equal(d2[k], d3[k]) for k in d2) and _fresh(tmp_path / "resumed" / "fm") == _fresh(two)


def test_resume_after_a_stop_ends_exactly_like_an_uninterrupted_run(data, tmp_path):
    cfg = tiny_config(checkpoint_every_steps=3)
    full = train_fm(cfg, data, tmp_path / "a" / "fm", seed=0, config_hash="t", progress=False)
    stopped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=11))
    assert train_fm(stopped, data, tmp_path / "b" / "fm", seed=0, config_hash="t", progress=False) is None
    work = tmp_path / "b" / "fm.work"
    assert not (tmp_path / "b" / "fm").exists()  # no half output
    assert json.loads((work / "checkpoints" / "LATEST").read_text())["step"] == 9  # 11 % 3 -> redo 10, 11
    resumed = train_fm(cfg, data, tmp_path / "b" / "fm", seed=0, config_hash="t", resume=True, progress=False)
    assert resumed == full  # exactly the same metrics
    a, b = _state(tmp_path / "a" / "fm"), _state(tmp_path / "b" / "fm")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "a" / "fm") == _losses(tmp_path / "b" / "fm")
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "fm" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # steps 1..28, then the eval record
    assert not work.exists()
    # TensorBoard too: the killed run's steps 10, 11 are replaced by the resumed run's, not stacked
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tb_losses(run: Path) -> list[tuple[int, float]]:
        acc = EventAccumulator(str(run / "fm" / "tb"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    assert tb_losses(tmp_path / "b") == tb_losses(tmp_path / "a")


def test_exported_model_reproduces_the_evaluation(data, tmp_path):
    from loopfm.data.eventlog import EventLog
    from loopfm.fm.batch import BatchBuilder, iter_batches
    from loopfm.metrics import binary_metrics

    cfg = tiny_config(train_days=[1, 2], eval_days=[3])
    metrics = train_fm(cfg, data, tmp_path / "fm", seed=0, config_hash="t", progress=False)
    model, schema = load_trained_fm(tmp_path)
    assert schema.dataset == "toy" and not model.training
    probs, labels = [], []
    for batch in iter_batches(EventLog(data), [3], 128, BatchBuilder(model.layout)):
        out = model.forward_with_taps(batch)
        real = batch.weights > 0
        probs.append(out["probs"][real])
        labels.append(batch.labels[real])
        assert out["z"].shape[1] == 8 and out["hidden0"].shape[1] == 16
    m = binary_metrics(torch.cat(labels).numpy(), torch.cat(probs).double().numpy())
    for k in ("auc", "logloss", "ne"):
        assert m[k] == pytest.approx(metrics["3"][k], abs=1e-6)
    files = {p.name for p in (tmp_path / "fm").iterdir()}
    assert {"model.pt", "eval.json", "metrics.jsonl", "tb", "checkpoints", "plan.json", "_SUCCESS"} <= files


def test_freed_memory_is_reused_while_the_fm_trains():
    """Under `keep_freed_memory` a freed 16 MB block is reused, not mapped and faulted in again."""
    import resource

    from loopfm.fm.train import give_back_freed_memory, keep_freed_memory
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    try:
        for _ in range(2):  # allocated, touched and freed (the heap settles after the first two)
            torch.ones(4 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(4 << 20)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        give_back_freed_memory()
    assert faults < 500  # 4,096 pages of 4 KB if mapped afresh
