"""`loopfm sweep`: the whole pipeline once per value of one config key, then AUC vs that value.

The paper's Table 5 sweeps the LoopFM sequence length L; this runs any such sweep::

    loopfm sweep CONFIG --out DIR --param sequences.max_len=10,25,50,100 [key=value ...]

Point ``v`` runs `loopfm.pipeline.run_all` in ``DIR/<key>=<v>/``. Points run in the order given,
and a stage whose config hash (`pipeline.stage_hashes`, chained) equals the same stage's hash at
an earlier point is not run again: the point's stage folder becomes a relative symlink to the
earliest such point's complete folder, which `run_all` then finds up to date. Sweeping
``sequences.max_len`` thus trains one FM and reruns only build-sequences and train-vm. A stage
already complete in a later point's folder (a value put in front of a finished sweep) is linked
the same way.

``--force`` recomputes every distinct stage once: the first point runs with ``force``, a later
point's stages shared with an earlier point link to the folder just recomputed, and its own
stages are deleted before it runs.

DIR also gets ``sweep.json`` (shape in `run_sweep`), ``report.md`` (tables, reused stages, plot),
``auc_vs_<param>.png`` (one line per MODEL/VARIANT; ``auc_vs_L.png`` for ``sequences.max_len``)
and TensorBoard scalars in ``DIR/tb/sweep``.

Statistics: every point is compared with a reference point (``--reference V``, default the first
value), per model and variant, on the per-seed predictions both points wrote for the same test
rows: ΔAUC = the mean over seeds of the per-seed AUC(point) - AUC(reference), its paired t-test over
seeds and the user bootstrap of that same ΔAUC (`loopfm.report.compare`). The p-values are each one
comparison chosen before looking: a point picked as the best of k after seeing them is not tested by
its own p (the report also gives p x k, Bonferroni over the k points compared).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from loopfm.artifacts import is_complete
from loopfm.config import ConfigError, load_config, to_dict
from loopfm.experiment import LoopFMConfig
from loopfm.lock import run_lock
from loopfm.protocol import check_protocol
from loopfm.report.render import fmt_ci, fmt_number, fmt_p
from loopfm.stats import SEEDS_MEASURE, USERS_MEASURE

METRICS = {"auc": "AUC", "ne": "NE", "logloss": "LogLoss"}
# Short names the plots use for well-known keys (report.plot_sweep labels "L" as the sequence length).
PLOT_NAMES = {"sequences.max_len": "L"}


def parse_param(text: str) -> tuple[str, list[str]]:
    """``"sequences.max_len=10,25"`` -> ``("sequences.max_len", ["10", "25"])``.

    Values are split on commas (a list value such as ``[a,b]`` cannot be swept) and become folder
    names, so they must be distinct, non-empty and free of ``/``; at least two are needed.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--param {text!r}: expected KEY=V1,V2,..., e.g. sequences.max_len=10,25,50")
    labels = [v.strip() for v in raw.split(",")]
    if any(not v for v in labels):
        raise ConfigError(f"--param {text!r}: empty value")
    if "/" in key or any("/" in v or "\0" in v for v in labels):
        raise ConfigError(f"--param {text!r}: a value becomes a folder name and cannot contain '/'")
    if len(labels) < 2:
        raise ConfigError(f"--param {text!r}: a sweep needs at least two values")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--param {text!r}: duplicate values")
    return key, labels


def point_folder(key: str, label: str) -> str:
    """The run folder of one point, relative to the sweep folder (``sequences.max_len=10``)."""
    return f"{key}={label}"


def _value_at(cfg: LoopFMConfig, key: str) -> Any:
    node: Any = to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    return node


def _load_points(config_path: str | Path | None, overrides: Sequence[str], key: str,
                 labels: Sequence[str]) -> list[tuple[str, Any, LoopFMConfig]]:
    """(label, resolved value, config) per point; every point is checked before anything runs."""
    if any(o.partition("=")[0].strip() == key for o in overrides):
        raise ConfigError(f"{key} is swept by --param; remove its key=value override")
    points = []
    for label in labels:
        try:
            parsed = yaml.safe_load(label)
        except yaml.YAMLError as err:
            raise ConfigError(f"--param {key}: cannot parse value {label!r} ({err})") from None
        if isinstance(parsed, (list, dict)):
            raise ConfigError(f"--param {key}: value {label!r} is not a scalar")
        cfg = load_config(LoopFMConfig, config_path, [*overrides, f"{key}={label}"])
        try:
            check_protocol(cfg)
        except ConfigError as err:
            raise ConfigError(f"--param {key}={label}: {err}") from None
        points.append((label, _value_at(cfg, key), cfg))
    for i, (label, value, _) in enumerate(points):
        same = next((other for other, v, _ in points[:i] if v == value), None)
        if same is not None:
            raise ConfigError(f"--param {key}: values {same!r} and {label!r} are the same setting")
    return points


def check_sweep(config_path: str | Path | None, overrides: Sequence[str], param: str,
                reference: str | None = None) -> None:
    """The --param text, --reference and every point's config (day protocol included), before
    anything is written."""
    key, labels = parse_param(param)
    _check_reference(key, labels, reference)
    _load_points(config_path, overrides, key, labels)


def _check_reference(key: str, labels: Sequence[str], reference: str | None) -> str:
    reference = labels[0] if reference is None else str(reference)
    if reference not in labels:
        raise ConfigError(f"--reference {reference!r} is not one of the values of {key}: {', '.join(labels)}")
    return reference


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _share_stages(run_dir: Path, hashes: dict[str, str], others: list[tuple[str, Path, dict[str, str]]],
                  *, force: bool) -> dict[str, str]:
    """Link each of ``run_dir``'s stage folders to the first of ``others`` (label, run folder,
    stage hashes) with the same stage hash and a complete folder; returns {folder: its label} for
    the linked ones. A link points at the real folder, never at another link.

    A real complete folder with the right hash is kept, not linked, unless ``force``. A stage that
    is not shared must not be a symlink (`run_all` would write into the other point's folder), so
    such links are removed; with ``force`` its real folder is removed too, so it is recomputed.
    """
    from loopfm.pipeline import FOLDERS

    shared: dict[str, str] = {}
    for stage, folder in FOLDERS.items():
        path = run_dir / folder
        if not force and not path.is_symlink() and is_complete(path, hashes[stage]):
            continue
        source = next((label for label, other, h in others
                       if h[stage] == hashes[stage] and is_complete(other / folder, hashes[stage])), None)
        if source is None:
            if path.is_symlink() or (force and path.exists()):
                _remove(path)
            continue
        target = next(other for label, other, _ in others if label == source) / folder
        link = os.path.relpath(os.path.realpath(target), os.path.realpath(run_dir))
        shared[folder] = source
        if not (path.is_symlink() and os.readlink(path) == link):
            _remove(path)
            path.symlink_to(link, target_is_directory=True)
    return shared


def run_sweep(config_path: str | Path | None, overrides: Sequence[str], out: str | Path, param: str,
              values: Sequence[str], force: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print, reference: str | None = None) -> dict:
    """Run every point of the sweep into ``out`` and write the sweep's summary; returns sweep.json's
    content::

        {"param": key, "values": [resolved value per point], "runs": {label: folder},
         "auc" | "ne" | "logloss": {MODEL: {VARIANT: {label: float | null}}},
         "fm": {label: {"auc", "logloss", "ne"}}, "shared": {label: {stage folder: label}},
         "per_seed": {label: {MODEL: {VARIANT: {SEED: {"auc", "logloss", "ne", "gauc"}}}}},
         "reference": label, "statistics": {what each number of "comparisons" is},
         "comparisons": {label: {MODEL: {VARIANT: {"delta_auc", "seeds", "t_test",
                                                   "user_bootstrap"} | {"why_null"}}}}}

    ``values`` are the texts after ``=`` (``["10", "25"]``), each parsed as YAML by the config
    loader; labels (the dict keys) are these texts. ``reference``: the label every other point is
    compared with (default the first). Unknown keys, bad values, duplicates and an unknown
    reference raise `ConfigError` before any folder is made.
    """
    from loopfm import report
    from loopfm.pipeline import stage_hashes

    key, labels = parse_param(f"{param}={','.join(values)}")
    reference = _check_reference(key, labels, reference)
    points = _load_points(config_path, overrides, key, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"param": key, "values": [v for _, v, _ in points], "runs": {},
                               **{m: {} for m in METRICS}, "fm": {}, "shared": {}, "per_seed": {}}
    folders = [(label, out / point_folder(key, label), stage_hashes(cfg)) for label, _, cfg in points]
    with contextlib.ExitStack() as locks:  # the sweep folder and every point's run folder: one writer
        for folder in [out, *(run_dir for _, run_dir, _ in folders)]:
            locks.enter_context(run_lock(folder))
        _run_points(points, folders, summary, key, force=force, progress=progress, echo=echo)
        ref_cfg = next(cfg for label, _, cfg in points if label == reference)
        summary["reference"] = reference
        summary["statistics"] = sweep_statistics(key, reference)
        summary["comparisons"] = compare_points([(label, run_dir) for label, run_dir, _ in folders], reference,
                                                summary["per_seed"], n_boot=ref_cfg.report.n_boot,
                                                boot_seed=ref_cfg.report.boot_seed)
        report.write_results(out / "sweep.json", summary)
        write_sweep_report(out, summary)
        log_sweep_tensorboard(out / "tb", summary)
    return summary


def _run_points(points: list, folders: list, summary: dict[str, Any], key: str, *, force: bool, progress: bool,
                echo: Callable[[str], None]) -> None:
    from loopfm.pipeline import run_all

    for i, ((label, _, cfg), (_, run_dir, hashes)) in enumerate(zip(points, folders)):
        name = run_dir.name
        run_dir.mkdir(exist_ok=True)
        # Earlier points first; then, unless forced, a later point already complete from an earlier
        # invocation (a value added in front of a finished sweep reuses its FM).
        others = folders[:i] + ([] if force else folders[i + 1:])
        shared = _share_stages(run_dir, hashes, others, force=force and i > 0)
        echo(f"[sweep] {name} ({i + 1}/{len(points)}){_describe_shared(key, shared)}")
        results = run_all(cfg, run_dir, force=force and i == 0, progress=progress,
                          echo=lambda line, name=name: echo(f"[sweep] {name} {line}"))
        summary["runs"][label] = name
        summary["shared"][label] = shared
        summary["fm"][label] = results["fm"]
        summary["per_seed"][label] = results["per_seed"]
        for model, variants in results["vm"].items():
            for variant, entry in variants.items():
                for metric in METRICS:
                    summary[metric].setdefault(model, {}).setdefault(variant, {})[label] = entry.get(metric)


def sweep_statistics(key: str, reference: str) -> dict[str, str]:
    return {
        "reference": f"every point is compared with {key}={reference}, per model and variant, on the same "
                     "test rows",
        "delta_auc": "mean over the seeds both points have of the per-seed AUC(point) - AUC(reference)",
        "t_test": f"{SEEDS_MEASURE}, of the per-seed AUC difference; one comparison chosen in advance (a "
                  "point picked as the best of k after seeing the table needs p x k, Bonferroni)",
        "user_bootstrap": f"{USERS_MEASURE}, of delta_auc: users drawn with replacement, every seed of both "
                          "points scored on the same resample",
    }


def _point_predictions(run_dir: Path, per_seed: dict) -> tuple[Any, Any, Any, dict]:
    """(example ids, labels, users, {MODEL: {VARIANT: {seed: (preds, auc)}}}) of one point's test
    day; the AUCs are the point's own (``per_seed``: its results' per-seed metrics)."""
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / "vm" / "predictions.parquet")
    labels, users = table.column("label").to_numpy(), table.column("user_id").to_numpy()
    runs: dict = {}
    for name in table.column_names[3:]:
        model, variant, seed = name.split("/")
        preds = table.column(name).to_numpy().astype("float64")
        runs.setdefault(model, {}).setdefault(variant, {})[int(seed)] = (preds, per_seed[model][variant][seed]["auc"])
    return table.column("example_id").to_numpy(), labels, users, runs


def compare_points(points: Sequence[tuple[str, Path]], reference: str, per_seed: dict, *, n_boot: int,
                   boot_seed: int) -> dict[str, dict]:
    """``{label: {MODEL: {VARIANT: comparison}}}`` of every point but the reference against it
    (`loopfm.report.compare`), for the (model, variant) pairs both points trained. ``per_seed``:
    the summary's per-point test metrics (``{label: {MODEL: {VARIANT: {seed: {"auc": ...}}}}}``)."""
    import numpy as np

    from loopfm.report.results import ResampledAUCs, compare

    run_dirs = dict(points)
    ref_ids, labels, users, ref_runs = _point_predictions(run_dirs[reference], per_seed[reference])
    resampled = ResampledAUCs(labels, users, n_boot=n_boot, seed=boot_seed)  # the reference's, once
    out: dict[str, dict] = {}
    for label, _ in points:  # one point's predictions in memory at a time, beside the reference
        if label == reference:
            continue
        ids, _, _, runs = _point_predictions(run_dirs[label], per_seed[label])
        same_rows = np.array_equal(ids, ref_ids)
        out[label] = {}
        for model, variants in runs.items():
            for variant, by_seed in variants.items():
                if variant not in ref_runs.get(model, {}):
                    continue
                out[label].setdefault(model, {})[variant] = compare(
                    labels, users, by_seed, ref_runs[model][variant], n_boot=n_boot, boot_seed=boot_seed,
                    resampled=resampled) if same_rows else {"why_null": "the two points were tested on different rows (their test "
                                                 "days' example ids differ): no paired comparison"}
    return out


def comparison_table(summary: dict) -> str:
    """Markdown: each point against the reference, per MODEL/VARIANT: ΔAUC, seeds, both tests."""
    key, ref, comps = summary["param"], summary["reference"], summary.get("comparisons") or {}
    k = len(comps)
    bonferroni = k > 1  # a point picked as the best of k after seeing the table: p x k
    rows = [f"Each point against {key}={ref} (the same test rows): ΔAUC = mean over seeds of the per-seed "
            "AUC difference; p: paired t-test over seeds (what the seeds change); CI: user bootstrap of the "
            "same ΔAUC (what another sample of test users would change)"
            + (f"; p x {k}: Bonferroni over the {k} points compared, for a point picked after seeing the "
               "table." if bonferroni else "."), "",
            f"| {key} | model/variant | ΔAUC vs {ref} | seeds | p (seeds) |" + (f" p x {k} |" if bonferroni else "")
            + " 95% CI (users) | note |",
            "|---:|---|---:|---:|---:|" + ("---:|" if bonferroni else "") + "---|---|"]
    for label, models in comps.items():
        for model, variants in models.items():
            for variant, c in variants.items():
                t, boot = c.get("t_test", {}), c.get("user_bootstrap", {})
                p = t.get("p_value")
                ci = boot.get("ci95")
                note = "; ".join(sorted({w for w in (c.get("why_null"), t.get("why_null"), boot.get("why_null"))
                                         if w}))
                corrected = f" {fmt_p(None if p is None else min(1.0, p * k))} |" if bonferroni else ""
                rows.append(f"| {label} | {model}/{variant} | {fmt_number(c.get('delta_auc'), signed=True)} | "
                            f"{t.get('n', '–')} | {fmt_p(p)} |{corrected} {fmt_ci(ci)} | {note} |")
    return "\n".join(rows)


def _by_source(shared: dict[str, str]) -> dict[str, list[str]]:
    """{stage folder: point label} -> {point label: [stage folders]}."""
    grouped: dict[str, list[str]] = {}
    for folder, source in shared.items():
        grouped.setdefault(source, []).append(folder)
    return grouped


def _describe_shared(key: str, shared: dict[str, str]) -> str:
    """``"; reusing data, fm of sequences.max_len=2"``."""
    return "".join(f"; reusing {', '.join(folders)} of {key}={source}"
                   for source, folders in _by_source(shared).items())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sweep_lines(summary: dict, metric: str = "auc") -> dict[str, dict[Any, float | None]]:
    """{"MODEL/VARIANT": {value: metric}}: the shape `report.plot_sweep` draws one line per key of."""
    value_of = dict(zip(summary["runs"], summary["values"]))
    return {f"{model}/{variant}": {value_of[label]: x for label, x in by_label.items()}
            for model, variants in summary[metric].items() for variant, by_label in variants.items()}


def _plot_name(key: str) -> str:
    return PLOT_NAMES.get(key, key)


def sweep_table(summary: dict, metric: str = "auc") -> str:
    """Markdown: one row per point (in sweep order), one column per MODEL/VARIANT."""
    key = summary["param"]
    lines = sweep_lines(summary, metric)
    header = "sequence length L" if _plot_name(key) == "L" else key
    rows = [f"| {header} | " + " | ".join(lines) + " | FM (teacher) |",
            "|---:|" + "---:|" * (len(lines) + 1)]
    for label, value in zip(summary["runs"], summary["values"]):
        cells = [fmt_number(points.get(value)) for points in lines.values()]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {fmt_number(summary['fm'][label].get(metric))} |")
    return "\n".join(rows)


def write_sweep_report(out: Path, summary: dict) -> Path:
    """``out/report.md``: AUC / NE / LogLoss per point, which stages each point reused, the plot."""
    from loopfm import report
    from loopfm.artifacts import atomic_write_text

    key = summary["param"]
    parts = [f"# LoopFM sweep — {key}", "",
             f"The whole pipeline ran once per value of `{key}`, each in its own folder; a stage whose "
             "config matched an earlier point's was linked to that point's folder, not rerun.", ""]
    for metric, title in METRICS.items():
        parts += [f"## Test {title}", "", sweep_table(summary, metric), ""]
    if summary.get("comparisons"):
        parts += [f"## Against {key}={summary['reference']}", "", comparison_table(summary), ""]
    parts += ["## Runs", "", "| value | run folder | stages reused from |", "|---|---|---|"]
    for label, folder in summary["runs"].items():
        reused = "; ".join(f"{', '.join(folders)} ({key}={source})"
                           for source, folders in _by_source(summary["shared"][label]).items()) or "–"
        parts.append(f"| {label} | [{folder}]({folder}/report.md) | {reused} |")
    parts.append("")
    name = _plot_name(key)
    fname = f"auc_vs_{name}.png"
    if all(_is_number(v) for v in summary["values"]) and report.plot_sweep(name, sweep_lines(summary), out / fname):
        title = "AUC vs sequence length" if name == "L" else f"AUC vs {key}"
        parts += ["## Plot", "", f"![{title}]({fname})", ""]
    else:
        parts += ["## Plot", "", f"No plot: the values of {key} are not all numbers.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def log_sweep_tensorboard(tb_dir: Path, summary: dict) -> Path:
    """Scalars ``sweep/<param>/<MODEL/VARIANT>/<metric>`` in ``tb_dir/sweep``, replacing earlier ones
    (step = the value for an integer param, else the point's index). Written here, not by `report.log_tensorboard`, because
    that one needs a single run's results and logs only the AUC of a sweep."""
    from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import

    from loopfm.artifacts import replaced_folder

    values = summary["values"]
    steps = values if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else range(len(values))
    step_of = dict(zip(summary["runs"], steps))
    name = _plot_name(summary["param"])
    folder = tb_dir / "sweep"
    with replaced_folder(folder) as tmp:  # a rerun replaces the summary, not adds to it
        writer = SummaryWriter(log_dir=str(tmp))
        try:
            for metric in METRICS:
                for model, variants in summary[metric].items():
                    for variant, by_label in variants.items():
                        for label, x in by_label.items():
                            if x is not None:
                                writer.add_scalar(f"sweep/{name}/{model}/{variant}/{metric}", x, step_of[label])
            writer.flush()
        finally:
            writer.close()
    return folder
