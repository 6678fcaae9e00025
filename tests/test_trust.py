"""Trustworthy runs: the day protocol before any work, one writer per run folder, verified
artefacts, restart after a config change, one-line errors, input hygiene, progress in logs.
Each test holds one row of the README's "Guarantees" table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from loopfm.artifacts import ManifestError, atomic_output, inside, write_manifest
from loopfm.cli import main
from loopfm.lock import run_lock
from tests.tiny import TINY_MODELS

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
TINY = ["data.synthetic.rows=4000", *TINY_MODELS, "vm.models=[deepfm]", "vm.variants=[baseline,loopfm]"]


def _run(out: Path, *extra: str) -> int:
    return main(["run", CONFIG, "--out", str(out), "--quiet", *TINY, *extra])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. the day protocol ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["vm.train_days=[]"], "vm.train_days"),
    (["vm.models=[foo]"], "vm.models"),
    (["vm.test_day=3"], "vm.test_day"),
    (["vm.test_day=9"], "vm.test_day=9"),
    (["fm.train.train_days=[1,2,3,4,5]", "fm.train.eval_days=[6,7,8]"], "vm.train_days"),
    (["fm.train.eval_days=[5,6,7]"], "fm.train.eval_days"),
    (["extract.days=[5,6,7]"], "extract.days"),
    (["compress.fit_days=[5,8]"], "compress.fit_days"),
    (["fm.train.refresh_days=[5,6,7,8]"], "fm.train.refresh_days"),
    (["sequences.days=[6,7,8]"], "sequences.days"),
    (["vm.model.encoder=bogus"], "vm.model.encoder"),
    (["compress.quantizer=int3"], "compress.quantizer"),
])
def test_protocol_is_checked_before_anything_is_written(tmp_path, capsys, overrides, key):
    out = tmp_path / "run"
    assert _run(out, *overrides) == 2
    line = _one_line(capsys.readouterr().err)
    assert key in line, line
    assert not out.exists()


def test_tune_kd_never_tunes_on_the_test_day(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["tune-kd", CONFIG, "--out", str(out), *TINY, "tune_kd.valid_day=8"]) == 2
    assert "tune_kd" in _one_line(capsys.readouterr().err) and not out.exists()


def test_a_configured_day_missing_from_the_log_stops_right_after_prepare(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "data.synthetic.days=7", "vm.test_day=7", "vm.train_days=[5,6]",
                "fm.train.eval_days=[5,6,7]", "extract.days=[5,6,7,8]") == 2
    assert "extract.days: days [8] are not in the event log" in _one_line(capsys.readouterr().err)
    assert (out / "data" / "_SUCCESS").is_file() and not (out / "fm").exists()


def test_an_empty_day_list_never_means_all_days(tmp_path):
    from loopfm.data.eventlog import EventLog
    from tests.stages.util import toy_event_log

    log = EventLog(toy_event_log(tmp_path))
    assert log.num_rows(None) == log.num_rows(log.days) > 0
    with pytest.raises(ValueError, match="empty list of days"):
        log.num_rows([])
    with pytest.raises(ValueError, match="empty list of days"):
        log.files([])


def test_compress_fits_on_every_extract_day_but_the_test_day():
    from loopfm.stages.compress import CompressConfig, _resolve

    src = {"dim": 8, "kind": "codes", "rows_per_day": {"5": 1, "6": 1, "7": 1, "8": 1}}
    assert _resolve(CompressConfig(dim=8), src)[2] == [5, 6, 7]  # alone: the last day is held out
    assert _resolve(CompressConfig(dim=8), src, test_day=8)[2] == [5, 6, 7]  # the same where they coincide
    assert _resolve(CompressConfig(dim=8), src, test_day=7)[2] == [5, 6, 8]


# -- 2. the run-folder lock ---------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from loopfm.lock import run_lock
    with run_lock(sys.argv[1], ["loopfm", "run", "holder-config.yaml"]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_of_a_run_folder_stops_at_once(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "loopfm.cli", "train-vm", CONFIG, "--out", str(run),
                                 *TINY], capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2, second.stderr
        line = _one_line(second.stderr)
        assert f"pid {holder.pid}" in line and "loopfm run holder-config.yaml" in line, line
        assert time.monotonic() - start < 60  # at once, not after the holder ends
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run):  # the kernel dropped the dead holder's lock
        pass


def test_a_sweep_holds_every_point_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    point = sweep / "sequences.window_days=2"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(point)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["sweep", CONFIG, "--out", str(sweep), "--param", "sequences.window_days=2,5", "--quiet",
                     *TINY]) == 2
        assert f"pid {holder.pid}" in _one_line(capsys.readouterr().err)
        assert not (sweep / "sequences.window_days=5" / "data").exists()
    finally:
        holder.kill()
        holder.wait()


def test_only_the_lock_holder_removes_temp_folders_and_never_a_live_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (live.pid, 2 ** 22 + 12345):  # a live process's, and a dead one's
            (tmp_path / f".vm.tmp-{pid}-abcd1234").mkdir()

        def write():
            with atomic_output(tmp_path / "vm") as tmp:
                write_manifest(tmp, stage="t", config_hash="h")

        write()  # not the holder: removes nothing
        assert len(list(tmp_path.glob(".vm.tmp-*"))) == 2
        with run_lock(tmp_path):
            write()
        assert [p.name for p in tmp_path.glob(".vm.tmp-*")] == [f".vm.tmp-{live.pid}-abcd1234"]
    finally:
        live.kill()
        live.wait()


# -- 4. artefact integrity --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    assert _run(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


def test_every_success_lists_its_files_and_verify_says_ok(finished_run, capsys):
    m = json.loads((finished_run / "compress" / "_SUCCESS").read_text())
    part = next(k for k in m["files"] if k.endswith(".parquet"))
    assert m["files"][part]["bytes"] == (finished_run / "compress" / part).stat().st_size
    assert m["files"][part]["rows"] == pq.read_metadata(finished_run / "compress" / part).num_rows
    assert main(["verify", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 6, out


def _damage_compress_part(run: Path) -> Path:
    part = sorted((run / "compress" / "codes").rglob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-100])
    return part


@pytest.mark.parametrize("damage, stage", [
    (_damage_compress_part, "compress"),
    (lambda run: (run / "sequences" / "user" / "examples" / "day=8.parquet").unlink()
     or run / "sequences" / "user" / "examples" / "day=8.parquet", "build-sequences"),
    (lambda run: (run / "vm" / "_SUCCESS").write_text('{"stage": "train-vm", ') or run / "vm" / "_SUCCESS",
     "train-vm"),
])
def test_a_damaged_stage_is_named_by_verify_and_redone_by_run(run_copy, capsys, damage, stage):
    path = damage(run_copy)
    assert main(["verify", str(run_copy)]) == 2
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(stage))
    assert "damaged" in line and str(path) in line, out
    assert _run(run_copy) == 0
    out = capsys.readouterr().out
    assert f"[{stage}] damaged" in out and f"[{stage}] done" in out, out
    assert "[train-fm] up to date" in out
    assert main(["verify", str(run_copy)]) == 0


def test_a_stage_command_on_a_damaged_input_stops_naming_the_file(run_copy, capsys):
    part = _damage_compress_part(run_copy)
    assert main(["build-sequences", CONFIG, "--out", str(run_copy), "--force", "--quiet", *TINY]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(part) in line and "damaged" in line, line


def test_a_truncated_timings_json_does_not_stop_a_run(run_copy, capsys):
    (run_copy / "timings.json").write_text('{"prepare": 1.')
    assert _run(run_copy) == 0
    assert "timings.json is not valid JSON" in capsys.readouterr().out
    assert json.loads((run_copy / "timings.json").read_text())["report"] >= 0


def test_manifest_paths_stay_inside_the_run_folder(tmp_path):
    from loopfm.fm.checkpoint import Checkpointer
    from loopfm.stages import codes_format as cf

    for bad in ("../elsewhere", "/etc", "shards/../../x"):
        with pytest.raises(ManifestError, match="leaves the folder"):
            inside(tmp_path, bad)
        with pytest.raises(ManifestError, match="leaves the folder"):
            cf.stage_files(tmp_path, 5, {"shards": [bad]})
    (tmp_path / "LATEST").write_text(json.dumps({"dir": "../../x", "step": 1}))
    with pytest.raises(ManifestError, match="leaves the folder"):
        Checkpointer(tmp_path).latest()
    assert inside(tmp_path, "shards/rank-0") == tmp_path / "shards" / "rank-0"


# -- 6. restart after a killed train-fm ---------------------------------------------------------------
def test_a_changed_config_after_a_killed_fm_names_the_keys_and_force_starts_over(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["prepare", CONFIG, "--out", str(run / "data"), "--quiet", *TINY]) == 0
    # max_steps stops train-fm part-way, as a kill would: a checkpoint, no RUN/fm
    every = "fm.train.checkpoint_every_steps=1"
    assert main(["train-fm", CONFIG, "--out", str(run), "--quiet", *TINY, every, "fm.train.max_steps=2"]) == 0
    assert (run / "fm.work" / "checkpoints" / "LATEST").is_file() and not (run / "fm").exists()
    capsys.readouterr()
    changed = [every, "fm.optimizer.dense_lr=0.002", "fm.model.dropout=0.1"]
    assert _run(run, *changed) == 2
    line = _one_line(capsys.readouterr().err)
    assert "changed: fm.model.dropout, fm.optimizer.dense_lr)" in line and "--force" in line, line
    assert _run(run, *changed, "--force") == 0
    assert json.loads((run / "fm" / "_SUCCESS").read_text())["steps"] > 2 and not (run / "fm.work").exists()


# -- 7. errors: one line, exit 2; Ctrl-C 130; tracebacks only with --debug ------------------------------
def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, capsys, monkeypatch):
    import loopfm.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_prepare", interrupted)
    assert _run(tmp_path / "run") == 130
    assert _one_line(capsys.readouterr().err).endswith("interrupted; rerun the same command to resume")


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import loopfm.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "run_prepare", broken)
    assert _run(tmp_path / "run") == 1
    assert "RuntimeError: a bug (rerun with --debug" in _one_line(capsys.readouterr().err)
    with pytest.raises(RuntimeError, match="a bug"):
        _run(tmp_path / "run", "--debug")


def test_events_prepare_without_schema_is_one_line(tmp_path, capsys):
    data = tmp_path / "events.csv"
    data.write_text("ts,uid,iid,clicked\n1600000000,1,2,0\n")
    assert main(["prepare", "--source", "events", "--input", str(data), "--out", str(tmp_path / "run" / "data"),
                 "--quiet"]) == 2
    assert "data.events.schema" in _one_line(capsys.readouterr().err)


# -- 8. input hygiene -------------------------------------------------------------------------------
def _events(tmp_path: Path, rows: list[str], feature: str = "region") -> list[str]:
    data = tmp_path / "events.csv"
    data.write_text("ts,uid,iid,clicked,region\n" + "\n".join(rows) + "\n")
    schema = {"timestamp": {"column": "ts", "unit": "s"}, "label": {"column": "clicked"}, "user": "uid",
              "item": "iid", "features": [{"name": feature, "column": "region", "kind": "categorical"}],
              "days": {"by": "calendar", "tz": "UTC"}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    return ["prepare", "--source", "events", "--input", str(data), "--schema", str(tmp_path / "schema.yaml"),
            "--out", str(tmp_path / "run" / "data"), "--quiet"]


GOOD_ROWS = [f"{1_600_000_000 + 3600 * i},{i % 5},{i % 7},{i % 2},r{i % 3}" for i in range(60)]


def test_a_feature_name_that_is_a_path_is_refused(tmp_path, capsys):
    assert main(_events(tmp_path, GOOD_ROWS, feature="../../x")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "features[0].name" in line and "identifier" in line, line
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("ts", [-100, 4_102_444_800])  # 1969, 2100
def test_implausible_timestamps_are_refused_unless_allowed(tmp_path, capsys, ts):
    """The events source names the file line (header = line 1); other sources are checked by prepare."""
    rows = [*GOOD_ROWS[:10], f"{ts},1,2,0,r1", *GOOD_ROWS[10:]]
    assert main(_events(tmp_path, rows)) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'events.csv'}, row 12, column 'ts': timestamp '{ts}' is outside" in line, line
    assert "data.allow_any_time=true" in line and not (tmp_path / "run" / "data").exists()
    assert main([*_events(tmp_path, rows), "data.allow_any_time=true"]) == 0


def test_prepare_checks_the_time_range_of_every_source(tmp_path):
    import numpy as np

    from loopfm.data.errors import DataError
    from loopfm.data.prepare import prepare
    from tests.data.test_prepare import ToySource

    ts = np.arange(100) * 600 + 1_700_000_000
    ts[42] = 0
    with pytest.raises(DataError, match=r"column 'ts': data row 43 .* outside \[1990-01-01, now \+ 1 day\]"):
        prepare(ToySource(100, ts=ts), tmp_path / "o", config_hash="h", progress=False)
    prepare(ToySource(100, ts=ts), tmp_path / "o", config_hash="h", progress=False, allow_any_time=True)


def test_a_day_with_one_class_is_a_warning_at_prepare(tmp_path, capsys):
    rows = [*GOOD_ROWS, *[f"{1_600_000_000 + 5 * 86400 + 60 * i},1,2,0,r1" for i in range(5)]]
    assert main(_events(tmp_path, rows)) == 0
    err = capsys.readouterr().err
    assert "warning: day 6 has one class only (5 rows, all labels 0)" in err
    manifest = json.loads((tmp_path / "run" / "data" / "_SUCCESS").read_text())
    assert manifest["one_class_days"] == [6]


# -- 10. progress bars only on a terminal ---------------------------------------------------------------
def test_progress_in_a_log_is_at_most_one_line_per_30s(capsys):
    from loopfm.progress import LogProgress, progress_bar

    bar = progress_bar(range(10_000), desc="stage", unit="ex")  # pytest's stderr is no terminal
    assert isinstance(bar, LogProgress)
    assert sum(1 for _ in bar) == 10_000
    lines = capsys.readouterr().err.splitlines()
    assert lines == [lines[0]] and lines[0].startswith("[stage] 10000/10000 ex"), lines
    list(progress_bar(range(5), desc="quiet", enabled=False))
    assert capsys.readouterr().err == ""
    bar = LogProgress(desc="slow", total=3, every_s=0.0)
    bar.update(1)
    bar.update(1)
    assert len(capsys.readouterr().err.splitlines()) == 2


# -- issue 12: one list of stages ---------------------------------------------------------------------
def test_one_list_of_stages():
    from loopfm import launch, pipeline
    from loopfm.cli import build_parser

    assert launch.PIPELINE is pipeline.STAGES and launch.available_stages() == list(pipeline.STAGES)
    parser = build_parser()
    for stage in pipeline.STAGES:
        assert parser.parse_args([stage, "--out", "x"]).command == stage
    assert "_actions" not in Path(launch.__file__).read_text()
    assert "fabricate_extract" not in (REPO / "loopfm" / "stages" / "codes_format.py").read_text()
