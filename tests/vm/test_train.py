"""The VM trainer: one streaming pass + evaluation, determinism, logging; learning on the real
MovieLens-100K event log; and a fabricated LoopFM sequence that carries signal beats the baseline."""
from __future__ import annotations

import dataclasses
import pytest
import torch

import kernels
from loopfm.data.schema import FeatureSpec, Schema
from loopfm.vm import MODELS, KDConfig, VMBatch, VMModelConfig, VMTrainConfig, iter_vm_batches, run_vm


class Recorder:
    def __init__(self):
        self.records = []

    def log(self, scalars, step):
        self.records.append((step, dict(scalars)))


def fabricate(n_users=2000, n_items=50, per_user=6, d=8, L=10, seed=0, noise=0.5):
    """Labels depend on a hidden user vector × a hidden item vector; the VM sees user and item ids
    (each user only a few times, so its id embedding cannot learn the vector in one pass) and a
    LoopFM sequence of INT4 codes = noisy copies of the hidden user vector."""
    g = torch.Generator().manual_seed(seed)
    hu = torch.randn(n_users, d, generator=g) * (2 / d ** 0.5)
    hv = torch.randn(n_items, d, generator=g)
    n = n_users * per_user
    users = torch.randint(1, n_users, (n,), generator=g)
    items = torch.randint(1, n_items, (n,), generator=g)
    logit = 1.5 * (hu[users] * hv[items]).sum(-1)
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
    lengths = torch.randint(0, L + 1, (n,), generator=g, dtype=torch.int32)
    z = (hu[users][:, None, :] + noise * torch.randn(n, L, d, generator=g)).clamp(-1, 1)
    schema = Schema(dataset="syn", user_key="user_id", item_key="item_id", num_days=2, features=[
        FeatureSpec("user_id", "categorical", "user", vocab_size=n_users),
        FeatureSpec("item_id", "categorical", "item", vocab_size=n_items)])
    cols = dict(users=users, items=items, labels=labels, soft=torch.sigmoid(logit),
                packed=kernels.pack_int4(kernels.quantize_uniform_int4(z)), lengths=lengths,
                deltas=torch.rand(n, L, generator=g) * 86400)
    return schema, cols


def batches(cols, lo, hi, bs):
    out = []
    for s in range(lo, hi, bs):
        e = min(s + bs, hi)
        b = VMBatch(sparse={"user_id": cols["users"][s:e], "item_id": cols["items"][s:e]},
                    dense=torch.zeros(e - s, 0), labels=cols["labels"][s:e], user_ids=cols["users"][s:e],
                    soft_labels=cols["soft"][s:e])
        out.append(b.with_sequence(packed=cols["packed"][s:e], lengths=cols["lengths"][s:e],
                                   deltas=cols["deltas"][s:e]))
    return out


@pytest.fixture(scope="module")
def synthetic():
    schema, cols = fabricate()
    n = len(cols["labels"])
    cut = int(0.8 * n)
    return schema, batches(cols, 0, cut, 256), batches(cols, cut, n, 4096)


MODEL = VMModelConfig(model="deepfm", embedding_dim=8, dnn=[32], kernel_backend="reference")
TRAIN = VMTrainConfig(lr=0.01, seed=0)


@pytest.mark.parametrize("model,encoder", [(m, "dmin") for m in MODELS] + [("deepfm", e) for e in ("mean", "sum", "din")])
def test_loopfm_sequence_with_signal_beats_baseline(synthetic, model, encoder):
    schema, train, test = synthetic
    cfg = dataclasses.replace(MODEL, model=model, encoder=encoder)
    base = run_vm(cfg, TRAIN, KDConfig(), schema, train, test, variant="baseline")
    loop = run_vm(cfg, TRAIN, KDConfig(), schema, train, test, variant="loopfm")
    print(f"synthetic {model}/{encoder}: baseline AUC {base.metrics['auc']:.4f}, loopfm AUC {loop.metrics['auc']:.4f}")
    assert base.model.encoder is None and loop.model.encoder is not None
    assert loop.metrics["auc"] > base.metrics["auc"] + 0.1
    assert loop.metrics["ne"] < base.metrics["ne"] - 0.05


def test_deterministic_and_logged(synthetic):
    schema, train, test = synthetic
    logs = Recorder()
    cfg = dataclasses.replace(TRAIN, log_every=10)
    train, test = train[:20], test[:1]
    a = run_vm(MODEL, cfg, KDConfig(), schema, train, test, variant="kd+loopfm", logger=logs, prefix="vm/")
    b = run_vm(MODEL, cfg, KDConfig(), schema, iter(train), iter(test), variant="kd+loopfm")
    assert (a.preds == b.preds).all() and a.metrics == b.metrics
    assert a.steps == len(train) and len(a.preds) == sum(len(t) for t in test)
    assert set(a.metrics) == {"auc", "logloss", "ne", "gauc"}
    train_logs = [r for s, r in logs.records if "vm/train/loss" in r]
    assert len(train_logs) == a.steps // 10 and all("vm/train/loss_kd" in r for r in train_logs)
    assert logs.records[-1] == (a.steps, {f"vm/eval/{k}": v for k, v in a.metrics.items()})
    c = run_vm(MODEL, dataclasses.replace(TRAIN, seed=1), KDConfig(), schema, train, test, variant="kd+loopfm")
    assert not (a.preds == c.preds).all()


def test_variant_errors(synthetic):
    schema, train, test = synthetic
    plain = [dataclasses.replace(b, seq_packed=None, seq_lengths=None, seq_deltas=None) for b in train[:2]]
    with pytest.raises(ValueError, match="sequences"):
        run_vm(MODEL, TRAIN, KDConfig(), schema, plain, test, variant="loopfm")
    no_soft = [dataclasses.replace(b, soft_labels=None) for b in train[:2]]
    with pytest.raises(ValueError, match="soft labels"):
        run_vm(MODEL, TRAIN, KDConfig(), schema, no_soft, test, variant="kd")
    with pytest.raises(ValueError):
        VMTrainConfig(lr=0)


def test_deepfm_learns_on_movielens(ml_log):
    """DeepFM baseline, days 5-7 one pass, test on day 8 (FuxiCTR's DeepFM on ids: ~0.696)."""
    log = ml_log
    assert [f.name for f in log.schema.vm_features()] == ["user_id", "item_id"]
    train = iter_vm_batches(log, [5, 6, 7], 256)
    test = iter_vm_batches(log, [8], 4096)
    r = run_vm(VMModelConfig(model="deepfm"), VMTrainConfig(lr=0.01, seed=0), KDConfig(), log.schema,
               train, test, variant="baseline")
    print(f"MovieLens-100K DeepFM baseline day 8: {r.metrics}")
    assert r.steps == sum(-(-log.num_rows([d]) // 256) for d in (5, 6, 7))  # one pass, a batch per step
    assert len(r.preds) == log.num_rows([8])
    assert r.metrics["auc"] > 0.6 and r.metrics["gauc"] > 0.55 and r.metrics["ne"] < 1.0


def test_device_setting():
    from loopfm.vm.train import resolve_device

    with pytest.raises(ValueError, match="vm.train.device"):
        VMTrainConfig(device="gpu")
    assert VMTrainConfig().device == "auto"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no GPU"):
            resolve_device("cuda")


def test_batches_on_the_training_device_are_not_rebuilt(synthetic):
    from loopfm.vm.train import on_device

    _, train, _ = synthetic
    assert train[0].to("cpu") is train[0]
    assert all(a is b for a, b in zip(on_device(train[:3], torch.device("cpu")), train[:3]))


def test_batches_for_another_device_are_copied_one_ahead(synthetic):
    """The non-CPU path of `on_device` (the meta device stands in for a GPU): every batch moved,
    none lost or reordered by the one-batch lookahead."""
    from loopfm.vm.train import on_device

    _, train, _ = synthetic
    sizes = [3, 5, 7]
    src = [dataclasses.replace(b, labels=b.labels[:n], user_ids=b.user_ids[:n], dense=b.dense[:n],
                               sparse={k: v[:n] for k, v in b.sparse.items()}, soft_labels=b.soft_labels[:n],
                               seq_packed=b.seq_packed[:n], seq_lengths=b.seq_lengths[:n],
                               seq_deltas=b.seq_deltas[:n]) for b, n in zip(train, sizes)]
    moved = list(on_device(src, torch.device("meta")))
    assert [len(b) for b in moved] == sizes
    assert all(b.device.type == "meta" and b.seq_packed.device.type == "meta" for b in moved)
    assert list(on_device([], torch.device("meta"))) == []


def test_flat_adam_is_adam_per_parameter(synthetic):
    """The flat fused update equals torch's Adam on each parameter (dense gradients), embedding
    padding rows stay zero, and afterwards every parameter owns its storage again."""
    from loopfm.vm.kd import kd_loss
    from loopfm.vm.model import build_model
    from loopfm.vm.train import FlatAdam

    schema, train, _ = synthetic
    cfg = dataclasses.replace(MODEL, model="dmin", kernel_backend="torch")
    train_cfg = dataclasses.replace(TRAIN, weight_decay=0.01, grad_clip=1.0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg, schema, seq_dim=8, kd=KDConfig()))
    flat_model, plain_model = models
    adam = torch.optim.Adam(plain_model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    with FlatAdam(flat_model, train_cfg) as opt:
        assert flat_model.embedding.sparse
        for batch in train[:5]:
            opt.zero_grad()
            kd_loss(flat_model(batch), batch.labels, batch.soft_labels, KDConfig())[0].backward()
            opt.step()
            adam.zero_grad()
            kd_loss(plain_model(batch), batch.labels, batch.soft_labels, KDConfig())[0].backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), train_cfg.grad_clip)
            adam.step()
    assert not flat_model.embedding.sparse
    params = dict(flat_model.named_parameters())
    for name, p in plain_model.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=name)
    pointers = {p.untyped_storage().data_ptr() for p in flat_model.parameters()}
    assert len(pointers) == len(params)
    for first, _ in flat_model.embedding.tables.values():
        assert torch.equal(flat_model.embedding.weight[first], torch.zeros(8))


def test_stacked_tables_look_up_each_vocabulary():
    """One weight for all tables: a feature reads its own vocabulary's rows, id 0 reads zeros."""
    from loopfm.vm.layers import FeatureEmbedding

    torch.manual_seed(0)
    features = [FeatureSpec("user_id", "categorical", "user", vocab_size=5),
                FeatureSpec("price", "numeric", "item"),
                FeatureSpec("item_id", "categorical", "item", vocab_size=7)]
    emb = FeatureEmbedding(features, 4)
    assert emb.tables == {"user_id": (0, 5), "item_id": (5, 7)}
    batch = VMBatch(sparse={"user_id": torch.tensor([0, 3]), "item_id": torch.tensor([6, 0])},
                    dense=torch.tensor([[2.0], [0.5]]), labels=torch.zeros(2), user_ids=torch.zeros(2, dtype=torch.long))
    x = emb(batch)
    assert x.shape == (2, 3, 4)  # fields in feature order: user, price, item
    w = emb.weight.detach()
    torch.testing.assert_close(x[:, 0], torch.stack([torch.zeros(4), w[3]]))
    torch.testing.assert_close(x[:, 1], torch.tensor([[2.0], [0.5]]) * emb.numeric.detach()[0])
    torch.testing.assert_close(x[:, 2], torch.stack([w[5 + 6], torch.zeros(4)]))
    x.sum().backward()
    assert torch.equal(emb.weight.grad[[0, 5]], torch.zeros(2, 4))  # padding rows get no gradient
