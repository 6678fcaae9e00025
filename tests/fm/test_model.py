"""The FM for one device: shapes, masks, empty histories, taps, the autoencoder's stop-gradient,
feature selection, and the vectorised batches it reads."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from loopfm.fm.batch import BatchBuilder, global_batches, iter_batches
from loopfm.fm.config import AutoencoderConfig, ModelConfig
from loopfm.fm.features import FeatureLayout, select_features
from loopfm.fm.model import DMIN, FoundationModel, _mean_pool
from tests.fm.toy import make_log, tiny_config


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return make_log(tmp_path_factory.mktemp("fm") / "log", n=600, days=4)


def _model(log, seed=0, ae=True, **model):
    cfg = tiny_config()
    mcfg = dataclasses.replace(cfg.model, **model)
    layout = FeatureLayout.build(select_features(log.schema, mcfg), mcfg.sequence_group)
    torch.manual_seed(seed)
    return FoundationModel(layout, mcfg, cfg.autoencoder if ae else None)


def _batch(log, model, size=32, rank=0, world=1):
    return next(iter_batches(log, [1], size, BatchBuilder(model.layout, rank, world)))


def test_layout_shares_the_history_table_with_its_target(log):
    lay = FeatureLayout.build(select_features(log.schema, ModelConfig()), "history")
    assert lay.behaviour == ("hist",) and lay.targets == ("iid",) and lay.seq_target == ("iid",)
    assert lay.pooled == ("uid",) and lay.numeric == ("price",) and lay.max_len == 3
    assert [t.features for t in lay.ec_tables] == [("iid", "hist")]
    assert [t.name for t in lay.ebc_tables] == ["t_uid"]


@pytest.mark.parametrize("arch", ["dmin", "deepfm"])
def test_forward_shapes_taps_and_codes(log, arch):
    model = _model(log, arch=arch)
    batch = _batch(log, model)
    loss, (logits, aux) = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (32,)
    assert set(aux) == {"fm_loss", "ae_loss"}
    out = model.forward_with_taps(batch)
    assert out["emb"].shape == (32, 4 * 8)  # lookups of uid, iid, price, mean-pooled hist
    assert [out[f"hidden{i}"].shape[1] for i in range(3)] == [16, 8, 4]
    assert out["z"].shape == (32, 8) and out["z"].abs().max() <= 1
    torch.testing.assert_close(out["probs"], torch.sigmoid(logits))
    # DNN input: 3 fields (uid, iid, price) x 8 + DMIN interests (2 heads x 4), or the lookups
    assert model.dnn_in == (3 * 8 + 2 * 4 if arch == "dmin" else 4 * 8)
    assert model.tap_dims == {"emb": 32, "hidden0": 16, "hidden1": 8, "hidden2": 4}


def test_dmin_masks_padding_and_pools_an_empty_history_to_zero():
    cfg = ModelConfig(embedding_dim=4, num_heads=2, head_dim=3, attention_mlp=[5], position_dim=2)
    torch.manual_seed(0)
    dmin = DMIN(seq_dim=4, seq_len=5, cfg=cfg)
    seq, target = torch.randn(3, 5, 4), torch.randn(3, 4)
    lengths = torch.tensor([0, 2, 5])
    out = dmin(seq, lengths, target)
    assert out.shape == (3, 6)
    assert torch.equal(out[0], torch.zeros(6))  # empty history: zeros, not an average of padding
    assert out[1].abs().sum() > 0
    noisy = seq.clone()
    noisy[0] = 99.0
    noisy[1, 2:] = -7.0  # values beyond the true length must not matter
    torch.testing.assert_close(dmin(noisy, lengths, target), out)
    pooled = _mean_pool(seq, lengths)
    assert torch.equal(pooled[0], torch.zeros(4))
    torch.testing.assert_close(pooled[1], seq[1, :2].mean(0))


def test_empty_history_rows_in_a_real_batch(log):
    model = _model(log)
    batch = _batch(log, model, size=64)
    lengths = batch.seq["hist"].lengths()
    assert (lengths == 0).any() and (lengths > 0).any()  # the toy log has both
    out = model.forward_with_taps(batch)
    assert torch.isfinite(out["logits"]).all()


def test_autoencoder_is_stop_gradient(log):
    """FM parameter gradients are identical with and without the autoencoder attached."""
    with_ae, without = _model(log, seed=3, ae=True), _model(log, seed=3, ae=False)
    fm_keys = [k for k in without.state_dict()]
    assert all(torch.equal(with_ae.state_dict()[k], without.state_dict()[k]) for k in fm_keys)
    batch = _batch(log, with_ae)
    for m in (with_ae, without):
        m.zero_grad()
        m(batch)[0].backward()
    grads = dict(without.named_parameters())
    for name, p in with_ae.named_parameters():
        if name.startswith("autoencoder."):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert torch.equal(p.grad, grads[name].grad), name


def test_matryoshka_loss_sums_every_prefix():
    from loopfm.fm.autoencoder import MatryoshkaAutoencoder

    ae = MatryoshkaAutoencoder(6, AutoencoderConfig(dim=4, prefixes=[1, 2, 4], hidden=[5], taps=["emb"]))
    e = torch.randn(7, 6)
    z, loss = ae(e)
    expected = sum((dec(z[:, :p]) - e).pow(2).sum(1) for p, dec in zip(ae.prefixes, ae.decoders))
    torch.testing.assert_close(loss, expected)
    assert len(ae.decoders) == 3 and ae.decoders[0][0].in_features == 1


def test_feature_groups_give_nested_fm_generations(log):
    fm1 = select_features(log.schema, ModelConfig(groups=[""]))  # no history: FM1
    fm2 = select_features(log.schema, ModelConfig())
    assert {f.name for f in fm1} < {f.name for f in fm2} and "hist" not in {f.name for f in fm1}
    model = _model(log, groups=[""])
    assert model.dmin is None and model.ec is None
    assert torch.isfinite(model(_batch(log, model))[0])
    assert [f.name for f in select_features(log.schema, ModelConfig(features=["iid", "hist"]))] == ["iid", "hist"]
    with pytest.raises(ValueError, match="did you mean 'hist'"):
        select_features(log.schema, ModelConfig(features=["hst"]))
    with pytest.raises(ValueError, match="no feature group 'ads'"):
        select_features(log.schema, ModelConfig(groups=["ads"]))


def test_batches_match_the_event_log_and_split_evenly_over_ranks(log):
    model = _model(log)
    b = BatchBuilder(model.layout)
    table = log.read([1])
    day1 = table.num_rows  # 150 rows -> global batches of 64, 64, 22 (padded)
    batches = list(iter_batches(log, [1], 64, b))
    assert len(batches) == 3 and [x.size for x in batches] == [64, 64, 64]
    last = batches[-1]
    assert last.norm.item() == day1 - 128 and last.weights.sum().item() == day1 - 128
    first = batches[0]
    np.testing.assert_array_equal(first.labels.numpy(), table.column("label").to_numpy()[:64])
    np.testing.assert_array_equal(first.sparse["uid"].values().numpy(), table.column("uid").to_numpy()[:64])
    hist = table.column("hist").to_pylist()[:64]
    np.testing.assert_array_equal(first.seq["hist"].lengths().numpy(), [len(h) for h in hist])
    np.testing.assert_array_equal(first.seq["hist"].values().numpy(), [x for h in hist for x in h])
    np.testing.assert_allclose(first.dense[:, 0].numpy(), table.column("price").to_numpy()[:64])
    # Two ranks: each gets half of every global batch; together they are the one-rank batch.
    halves = [list(iter_batches(log, [1], 64, BatchBuilder(model.layout, r, 2))) for r in range(2)]
    for whole, r0, r1 in zip(batches, *halves):
        assert r0.size == r1.size == 32
        torch.testing.assert_close(torch.cat([r0.labels, r1.labels]), whole.labels)
        torch.testing.assert_close(torch.cat([r0.weights, r1.weights]), whole.weights)
        for key in ("hist", "iid"):
            torch.testing.assert_close(torch.cat([r0.seq[key].values(), r1.seq[key].values()]),
                                       whole.seq[key].values())
        assert r0.norm == r1.norm == whole.norm
    assert sum(t.num_rows for _, t in global_batches(log, [1, 2], 64, b.columns)) == log.num_rows([1, 2])


def test_padding_rows_do_not_change_the_loss(log):
    model = _model(log)
    full = next(iter_batches(log, [1], 16, BatchBuilder(model.layout)))
    table = next(global_batches(log, [1], 16, BatchBuilder(model.layout).columns))[1]
    padded = BatchBuilder(model.layout)(table, 32)  # same 16 rows padded to 32 with weight 0
    torch.testing.assert_close(model(padded)[0], model(full)[0])
