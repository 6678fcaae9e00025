"""A tiny end-to-end `loopfm run`: every stage on a few thousand synthetic rows, results.json in
the documented shape with finite metrics, report and TensorBoard written, reruns skip."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopfm.cli import main
from tests.tiny import TINY_MODELS

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.rows=6000", *TINY_MODELS, "vm.models=[deepfm,dmin]", "vm.seeds=2"]
VARIANTS = {"baseline", "kd", "loopfm", "kd+loopfm"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(out), "--quiet", *TINY]) == 0
    # What the first run wrote, before later tests rerun parts of it with other settings.
    first = out.with_name(out.name + "_first")
    first.mkdir()
    for name in ("results.json", "vm/predictions.parquet", "fm/plan.json"):
        shutil.copy(out / name, first / Path(name).name)
    return out


def _without_timings(path: Path) -> dict:
    results = json.loads(path.read_text())
    results.pop("timings_s")
    return results


def test_same_config_gives_identical_results_and_predictions(tiny_run, tmp_path):
    """Determinism: a second run, in another folder and another process with another string-hash
    order, gives byte-identical predictions and results.json (timings aside)."""
    env = {**os.environ, "PYTHONHASHSEED": "2", "PYTHONPATH": str(REPO)}
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "loopfm.cli", "run", str(REPO / "configs" / "quickstart.yaml"),
                           "--out", str(again), "--quiet", *TINY], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = tiny_run.with_name(tiny_run.name + "_first")
    assert (again / "vm" / "predictions.parquet").read_bytes() == (first / "predictions.parquet").read_bytes()
    assert (again / "fm" / "plan.json").read_bytes() == (first / "plan.json").read_bytes()
    assert _without_timings(again / "results.json") == _without_timings(first / "results.json")


def test_results_json_shape_and_finite_metrics(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["dataset"] == "synthetic"
    assert set(results["fm"]) >= {"auc", "logloss", "ne"} and all(_finite(results["fm"][k]) for k in ("auc", "logloss", "ne"))
    assert set(results["vm"]) == {"deepfm", "dmin"}
    for model, variants in results["vm"].items():
        assert set(variants) == VARIANTS
        for variant, m in variants.items():
            assert {"auc", "logloss", "ne", "gauc", "auc_std", "n_seeds"} <= set(m)
            assert m["n_seeds"] == 2 and all(_finite(m[k]) for k in ("auc", "logloss", "ne", "gauc", "auc_std"))
        assert {"kd+loopfm_vs_kd", "kd+loopfm_vs_baseline", "loopfm_vs_baseline"} <= set(results["p_values"][model])
        for name, ci in results["bootstrap_ci95"][model].items():
            assert len(ci) == 2 and ci[0] <= ci[1], name
    assert "transfer_ratio" in results
    assert set(results["timings_s"]) >= {"prepare", "train-fm", "extract", "compress", "build-sequences",
                                         "train-vm", "report"}


def test_report_plots_and_tensorboard(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "KD + LoopFM" in report and "auc_by_variant.png" in report
    assert (tiny_run / "auc_by_variant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tiny_run / "tb").rglob("events.out.tfevents.*"))
    for stage in ("data", "fm", "extract", "compress", "sequences", "vm"):
        assert (tiny_run / stage / "_SUCCESS").is_file(), stage


def test_rerun_skips_finished_stages_and_vm_change_reruns_only_vm(tiny_run, capsys):
    assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tiny_run), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm"):
        assert f"[{stage}] up to date" in out, stage
    assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tiny_run), "--quiet", *TINY,
                 "vm.variants=[baseline,loopfm]", "vm.seeds=1"]) == 0
    out = capsys.readouterr().out
    assert "[build-sequences] up to date" in out and "[train-vm] done" in out
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results["vm"]["deepfm"]) == {"baseline", "loopfm"}
    # TensorBoard: the rerun's train-vm and report events replaced the first run's, not stacked on them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loopfm.report import results_scalars

    for stage in ("vm", "report"):
        assert len(list((tiny_run / "tb" / stage).glob("events.out.tfevents.*"))) == 1, stage
    acc = EventAccumulator(str(tiny_run / "tb" / "vm"))
    acc.Reload()
    assert not any("/kd/" in tag for tag in acc.Tags()["scalars"])  # the kd runs of the first run are gone
    acc = EventAccumulator(str(tiny_run / "tb" / "report"))
    acc.Reload()
    logged = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert {tag: v[0] for tag, v in logged.items()} == pytest.approx(results_scalars(results), rel=1e-6)
    assert all(len(v) == 1 for v in logged.values())


def test_sequences_show_is_auditable(tiny_run, capsys):
    import pyarrow.parquet as pq

    preds = pq.read_table(tiny_run / "vm" / "predictions.parquet", columns=["example_id"])
    eid = int(preds.column("example_id")[-1].as_py())
    assert main(["sequences", "show", str(tiny_run), "--example-id", str(eid)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["example_id"] == eid and all(h["ts"] < shown["ts"] for h in shown["history"])


def test_transfer_ratio_against_a_previous_fm_generation(tiny_run, tmp_path, capsys):
    """TR = dNE_VM / dNE_FM: a fabricated FM1 run whose FM and VMs are worse by 0.1 and 0.05 NE."""
    now = json.loads((tiny_run / "results.json").read_text())
    before = json.loads(json.dumps(now))
    before["fm"]["ne"] += 0.1
    for variants in before["vm"].values():
        for m in variants.values():
            m["ne"] += 0.05
    (tmp_path / "results.json").write_text(json.dumps(before))
    assert main(["report", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tiny_run), *TINY,
                 "vm.variants=[baseline,loopfm]", "vm.seeds=1", "--fm-before", str(tmp_path)]) == 0
    tr = json.loads((tiny_run / "results.json").read_text())["transfer_ratio"]
    assert tr["ne_fm_before"] == pytest.approx(now["fm"]["ne"] + 0.1)
    for model, variants in tr["by_model"].items():
        for variant, value in variants.items():
            assert value == pytest.approx(0.5, rel=1e-6), (model, variant)


def test_daily_fm_checkpoint_end_to_end(tmp_path):
    """Table 5's freshness ablation from the config: the FM refreshed each day scores the next."""
    from loopfm.artifacts import read_manifest

    assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tmp_path), "--quiet", *TINY,
                 "fm.train.refresh_days=[5,6,7]", "extract.fm_checkpoint=daily", "vm.models=[deepfm]",
                 "vm.seeds=1", "vm.variants=[kd,kd+loopfm]"]) == 0
    fm = read_manifest(tmp_path / "fm")
    assert read_manifest(tmp_path / "extract")["fm_as_of_day"] == {"5": None, "6": 5, "7": 6, "8": 7}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["fm"]["checkpoint"] == "daily" and results["fm"]["auc"] == fm["eval_fresh"]["8"]["auc"]
    assert all(_finite(m["auc"]) for m in results["vm"]["deepfm"].values())


def test_a_day_with_one_class_gives_null_metrics_with_reasons(shared_data, tmp_path):
    """The TaobaoAd DMR sample's day 6 has no click (62 rows): the FM's evaluation and the report
    give AUC / NE / gAUC as null with the reason instead of failing, here with day 6 as the test day."""
    sample = shared_data / "taobao-samples" / "alimama_dmr_267col_500.txt"
    if not sample.is_file():
        pytest.skip(f"{sample} is absent")
    tiny_fm = [o for o in TINY if o.startswith(("fm.", "compress.", "sequences.", "vm.model."))]
    assert main(["run", str(REPO / "configs" / "taobao_x1.yaml"), "--out", str(tmp_path), "--quiet", *tiny_fm,
                 f"data.taobao_x1.path={sample}", "vm.models=[deepfm]", "vm.seeds=2", "vm.train_days=[5]",
                 "vm.test_day=6", "vm.variants=[baseline,kd]"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["fm"]["auc"] is None and results["fm"]["undefined"]["auc"] == "all 62 labels are 0"
    for variant, m in results["vm"]["deepfm"].items():
        assert m["auc"] is None and m["ne"] is None and _finite(m["logloss"]), variant
        assert set(m["undefined"]) == {"auc", "ne", "gauc"}
    for comparison in results["comparisons"]["deepfm"].values():
        assert comparison["t_test"]["p_value"] is None and comparison["t_test"]["why_null"]
    assert "Undefined on the test day" in (tmp_path / "report.md").read_text()
