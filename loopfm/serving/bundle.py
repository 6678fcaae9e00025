"""`loopfm export`: a trained VM as a self-contained serving bundle, and its loader.

Bundle layout (written atomically)::

    BUNDLE/model.pt2         the VM as a torch.export program (no Python model class needed: loading
                             it needs only torch and the `kernels` package, which registers the
                             ``loopfm::int4_attend`` op it calls)
    BUNDLE/vocab/<name>.parquet   raw value (string; null = missing) -> id of every vocabulary the VM
                             reads, plus the sequence key's; an unseen value gets the OOV id
                             ``vocab_size - 1``, as at prepare time
    BUNDLE/_SUCCESS          the manifest: run name, the model's inputs in order (features with kind,
                             vocabulary, size, max_len), the code spec (quantizer, dim, code_bytes,
                             codebook), the sequence spec (key kind, max_len, window_s), source run

The exported program takes five tensors, batch dimension dynamic: ``sparse`` long [B, n_cat],
``dense`` float [B, n_num], ``bags`` long [B, sum of the bag max_lens] with ``bag_lengths`` int32
[B, n_bag] (bag features side by side), and the sequence: ``seq`` (uint8 [B, L, code_bytes]
packed INT4, or float [B, L, d] decoded codes; see `loopfm.codes.inputs.stays_packed`), ``seq_lengths``
int32 [B], ``seq_deltas`` float [B, L] (seconds from each entry to the request). It returns the
served probability [B] (the serving head only, as `VerticalModel.predict`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from loopfm.artifacts import atomic_output, read_manifest, write_manifest
from loopfm.codes.inputs import stays_packed
from loopfm.codes.quant import QuantSpec

MODEL_FILE = "model.pt2"
BUNDLE_FORMAT = 1


class ExportError(ValueError):
    """The run cannot be served as asked (missing stage output, unservable variant...)."""


@dataclass(frozen=True)
class InputLayout:
    """Which VM-visible features feed which input tensor, in order."""
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    bags: tuple[tuple[str, int], ...]  # (name, max_len)

    @classmethod
    def from_schema(cls, schema) -> "InputLayout":
        feats = schema.vm_features()
        return cls(tuple(f.name for f in feats if f.kind == "categorical"),
                   tuple(f.name for f in feats if f.kind == "numeric"),
                   tuple((f.name, max(int(f.max_len), 1)) for f in feats if f.kind == "sequence"))


class ServingModule(nn.Module):
    """Flat tensors -> `VMBatch` -> the VM's served probability (what torch.export traces)."""

    def __init__(self, model: nn.Module, layout: InputLayout, codebook: Tensor | None, packed: bool) -> None:
        super().__init__()
        self.model, self.layout, self.packed = model, layout, packed
        self.register_buffer("codebook", codebook, persistent=True)

    def forward(self, sparse: Tensor, dense: Tensor, bags: Tensor, bag_lengths: Tensor, seq: Tensor,
                seq_lengths: Tensor, seq_deltas: Tensor) -> Tensor:
        from loopfm.vm.batch import VMBatch

        B = sparse.shape[0]
        bag_t, bag_len, start = {}, {}, 0
        for i, (name, max_len) in enumerate(self.layout.bags):
            bag_t[name], bag_len[name] = bags[:, start:start + max_len], bag_lengths[:, i]
            start += max_len
        has_seq = self.model.encoder is not None
        batch = VMBatch(sparse={n: sparse[:, i] for i, n in enumerate(self.layout.categorical)}, dense=dense,
                        bags=bag_t, bag_lengths=bag_len, labels=dense.new_zeros(B), user_ids=sparse.new_zeros(B),
                        seq_packed=seq if has_seq and self.packed else None,
                        seq_float=seq if has_seq and not self.packed else None,
                        seq_lengths=seq_lengths if has_seq else None, seq_deltas=seq_deltas if has_seq else None,
                        seq_codebook=self.codebook if has_seq and self.packed else None)
        return self.model.predict(batch)


def example_inputs(layout: InputLayout, spec: QuantSpec | None, max_len: int, batch: int = 3) -> tuple:
    """Inputs of the exported program's shapes (values only need to be valid ids)."""
    L = max(max_len, 1)
    if spec is None or stays_packed(spec):
        width = spec.code_bytes if spec is not None else 1
        seq = torch.zeros(batch, L, width, dtype=torch.uint8)
    else:
        seq = torch.zeros(batch, L, spec.dim)
    n_bag_pos = sum(m for _, m in layout.bags)
    return (torch.ones(batch, len(layout.categorical), dtype=torch.long), torch.zeros(batch, len(layout.numeric)),
            torch.zeros(batch, n_bag_pos, dtype=torch.long), torch.zeros(batch, len(layout.bags), dtype=torch.int32),
            seq, torch.full((batch,), 1, dtype=torch.int32), torch.ones(batch, L))


def export_bundle(run_dir: str | Path, model: str, variant: str, seed: int, out: str | Path) -> dict:
    """Write the serving bundle of run ``model/variant/seed`` of ``run_dir``; returns its manifest."""
    from loopfm.data.eventlog import EventLog
    from loopfm.stages.train_vm import run_name
    from loopfm.vm.checkpoint import checkpoint_path, load_vm

    run_dir = Path(run_dir)
    name = run_name(model, variant, seed)
    vm_manifest = read_manifest(run_dir / "vm")
    ckpt = checkpoint_path(run_dir / "vm", name)
    if not ckpt.is_file():
        have = sorted(str(p.relative_to(run_dir / "vm" / "models"))[:-3] for p in (run_dir / "vm").glob("models/*/*/*.pt"))
        raise ExportError(f"{run_dir}/vm has no trained VM {name!r}" + (f"; it has {have}" if have else
                          " (its train-vm output predates saved models: rerun train-vm)"))
    log = EventLog(run_dir / "data")
    schema = log.schema
    vm = load_vm(ckpt, schema)
    if vm.cfg.raw_seq:
        raise ExportError(f"{name} reads a raw item-id sequence from the event log (vm.model.raw_seq): "
                          "not servable from the code store")
    if vm.current_proj is not None:
        raise ExportError(f"{name} reads the FM's code of the request itself (kd+current): it needs a "
                          "real-time FM, which serving from stored codes exists to avoid")
    layout = InputLayout.from_schema(schema)
    key_kind = vm_manifest.get("sequence_key", "user")
    spec, seq_spec = None, {"key": key_kind, "max_len": 0, "window_s": 0}
    if vm.encoder is not None:
        spec = QuantSpec.from_manifest(read_manifest(run_dir / "compress"))
        seq_m = read_manifest(run_dir / "sequences")
        seq_spec = {"key": key_kind, "max_len": int(seq_m["max_len"]), "window_s": int(seq_m["window_s"])}
    packed = spec is not None and stays_packed(spec)
    codebook = torch.from_numpy(np.asarray(spec.codebook, np.float32)) if packed and spec.codebook is not None else None
    module = ServingModule(vm, layout, codebook, packed).eval()
    args = example_inputs(layout, spec, seq_spec["max_len"])
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    key_feature = schema.user_key if key_kind == "user" else schema.item_key
    vocabs = sorted({f.vocab_name for f in schema.vm_features() if f.vocab_name}
                    | {schema.feature(key_feature).vocab_name})
    features = [{"name": f.name, "kind": f.kind, "role": f.role, "vocab": f.vocab_name, "vocab_size": f.vocab_size,
                 "max_len": f.max_len} for f in schema.vm_features()]
    with atomic_output(out) as tmp:
        torch.export.save(program, tmp / MODEL_FILE)
        (tmp / "vocab").mkdir()
        for v in vocabs:
            shutil.copyfile(run_dir / "data" / "vocab" / f"{v}.parquet", tmp / "vocab" / f"{v}.parquet")
        return write_manifest(
            tmp, stage="export", config_hash=vm_manifest["config_hash"], format=BUNDLE_FORMAT, run=str(run_dir),
            name=name, model=model, variant=variant, seed=seed, test_day=vm_manifest.get("test_day"),
            user_key=schema.user_key, item_key=schema.item_key, key_feature=key_feature,
            key_vocab=schema.feature(key_feature).vocab_name, features=features,
            inputs={"categorical": list(layout.categorical), "numeric": list(layout.numeric),
                    "bags": [list(b) for b in layout.bags]},
            code_spec=None if spec is None else dict(spec.to_manifest(), packed=packed),
            sequence=seq_spec, torch=torch.__version__, needs=["torch", "kernels (the loopfm::int4_attend op)"])


class Vocabulary:
    """Raw value -> id with the prepare-time rule: unseen values get the OOV id; null is a value."""

    def __init__(self, path: Path, size: int | None = None) -> None:
        """``size``: the feature's vocab_size; None = the file's own (its values, padding and OOV)."""
        t = pq.read_table(path, columns=["value", "id"])
        self.ids = dict(zip(t.column("value").to_pylist(), t.column("id").to_pylist()))
        self.size = len(self.ids) + 2 if size is None else size
        self.oov_id = self.size - 1

    def raw_of(self) -> dict[int, object]:
        """id -> a raw value that maps back to it (the OOV id -> a value no vocabulary holds)."""
        inverse = {i: v for v, i in self.ids.items()}
        inverse[self.oov_id] = "\x00unseen"
        return inverse


class Bundle:
    """A loaded bundle: manifest, vocabularies, the exported program as a callable module."""

    def __init__(self, path: str | Path) -> None:
        import kernels  # noqa: F401  (registers loopfm::int4_attend, which the program calls)

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("stage") != "export" or self.manifest.get("format") != BUNDLE_FORMAT:
            raise ExportError(f"{path} is not a serving bundle of format {BUNDLE_FORMAT} (made by `loopfm export`)")
        self.features = {f["name"]: f for f in self.manifest["features"]}
        sizes = {f["vocab"]: f["vocab_size"] for f in self.manifest["features"] if f["vocab"]}
        key_feature = self.manifest["key_feature"]
        sizes.setdefault(self.manifest["key_vocab"], None)
        self.vocabs = {}
        for v, size in sizes.items():  # size None: the key feature may be fm_only, its vocabulary sizes it
            self.vocabs[v] = Vocabulary(self.path / "vocab" / f"{v}.parquet", size)
        self.key_vocab = self.vocabs[self.manifest["key_vocab"]]
        self.key_feature = key_feature
        inputs = self.manifest["inputs"]
        self.layout = InputLayout(tuple(inputs["categorical"]), tuple(inputs["numeric"]),
                                  tuple((n, int(m)) for n, m in inputs["bags"]))
        cs = self.manifest["code_spec"]
        self.spec = None if cs is None else QuantSpec.from_manifest(cs)
        self.sequence = self.manifest["sequence"]
        self.program = torch.export.load(self.path / MODEL_FILE).module()

    @property
    def uses_sequence(self) -> bool:
        return self.spec is not None

    def vocab_of(self, feature: str) -> Vocabulary:
        return self.vocabs[self.features[feature]["vocab"]]
