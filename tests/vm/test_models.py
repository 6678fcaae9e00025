"""Every model × {no sequence, INT4 through the kernel op, fp16 float codes}: shapes, finiteness,
gradients; masks from lengths; empty sequences; fm_only features never read."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from loopfm.vm import KDConfig, VMModelConfig, build_model
from loopfm.vm.model import MODELS
from tests.vm.util import make_batch, tiny_schema

SEQ = {"none": None, "int4": 8, "fp16": 8}


def model_for(name, seq, raw=False, kd="aux_head", encoder="dmin", seed=0):
    torch.manual_seed(seed)
    cfg = VMModelConfig(model=name, embedding_dim=4, dnn=[8], attention_mlp=[8], raw_seq=raw,
                        encoder=encoder, kernel_backend="reference")
    return build_model(cfg, tiny_schema(), seq_dim=SEQ.get(seq, 8 if seq != "none" else None),
                       kd=KDConfig(mode=kd))


@pytest.mark.parametrize("seq", ["none", "int4", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name, seq):
    for raw in (False, True):
        model = model_for(name, seq, raw=raw)
        batch = make_batch(seq=seq, raw=raw)
        out = model(batch)
        assert out["logit"].shape == (6,) and out["aux_logit"].shape == (6,)
        assert torch.isfinite(out["logit"]).all() and torch.isfinite(out["aux_logit"]).all()
        (out["logit"].sum() + out["aux_logit"].sum()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        if seq != "none":  # the encoder is trained
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
        p = model.predict(batch)
        assert p.shape == (6,) and ((p > 0) & (p < 1)).all()


def test_int4_goes_through_the_kernel_op(monkeypatch):
    calls = []
    real = kernels.int4_attend

    def spy(*a, **k):
        calls.append(a[0].dtype)
        return real(*a, **k)
    monkeypatch.setattr(kernels, "int4_attend", spy)
    model_for("deepfm", "int4")(make_batch(seq="int4"))
    assert calls == [torch.uint8]
    calls.clear()
    model_for("deepfm", "fp16")(make_batch(seq="fp16"))
    assert calls == [torch.float32]  # float codes go through the same op, as values


def _perturb_padding(batch):
    """Garbage in every padded position of every sequence (codes, deltas, raw ids, bags)."""
    b = dataclasses.replace(batch)
    g = torch.Generator().manual_seed(99)
    if b.seq_packed is not None or b.seq_float is not None:
        codes = b.seq_packed if b.seq_packed is not None else b.seq_float
        pad = torch.arange(codes.shape[1])[None] >= b.seq_lengths[:, None]
        if b.seq_packed is not None:
            noise = torch.randint(0, 256, codes.shape, generator=g, dtype=torch.uint8)
        else:
            noise = torch.full(codes.shape, 1e4, dtype=codes.dtype)
        new = torch.where(pad[..., None], noise, codes)
        b = b.with_sequence(packed=new if b.seq_packed is not None else None,
                            values=new if b.seq_float is not None else None, lengths=b.seq_lengths,
                            deltas=torch.where(pad, torch.full_like(b.seq_deltas, 1e9), b.seq_deltas),
                            codebook=b.seq_codebook)
    if b.raw_seq is not None:
        pad = torch.arange(b.raw_seq.shape[1])[None] >= b.raw_seq_lengths[:, None]
        b.raw_seq = torch.where(pad, torch.randint(1, 40, b.raw_seq.shape, generator=g), b.raw_seq)
    for k, v in b.bags.items():
        pad = torch.arange(v.shape[1])[None] >= b.bag_lengths[k][:, None]
        b.bags = {**b.bags, k: torch.where(pad, torch.randint(1, 7, v.shape, generator=g), v)}
    return b


@pytest.mark.parametrize("seq", ["int4", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_padding_never_changes_outputs(name, seq):
    model = model_for(name, seq, raw=True).eval()
    batch = make_batch(seq=seq, raw=True, lengths=[0, 1, 2, 3, 4, 5])
    a, b = model(batch), model(_perturb_padding(batch))
    torch.testing.assert_close(a["logit"], b["logit"], rtol=0, atol=1e-5)
    torch.testing.assert_close(a["aux_logit"], b["aux_logit"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoder", ["mean", "sum", "din", "dmin"])
@pytest.mark.parametrize("seq", ["int4", "fp16", "scalar"])
def test_empty_sequences_and_padding_per_encoder(encoder, seq):
    torch.manual_seed(0)
    cfg = VMModelConfig(model="dmin", embedding_dim=4, dnn=[8], attention_mlp=[8], raw_seq=True,
                        encoder=encoder, kernel_backend="reference")
    model = build_model(cfg, tiny_schema(), seq_dim=1 if seq == "scalar" else 8).eval()
    batch = make_batch(seq=seq, raw=True, lengths=[0, 0, 5, 1, 3, 0])
    batch.raw_seq_lengths = torch.tensor([0, 6, 0, 2, 0, 1], dtype=torch.int32)
    out = model(batch)["logit"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model(_perturb_padding(batch))["logit"], rtol=0, atol=1e-5)
    pooled = model.encoder(batch, model.query(model.embedding(batch)))
    assert (pooled[batch.seq_lengths == 0] == 0).all()  # empty sequences pool to zeros
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_fm_only_features_are_never_read(name):
    schema = tiny_schema()
    model = model_for(name, "int4", raw=True)
    fm_only = {f.name for f in schema.features if f.fm_only}
    tables = set(model.embedding.tables)
    assert not (tables & fm_only), tables
    assert "secret_segment" not in tables and model.embedding.numeric_names == ["price"]
    # the fm_only raw-seq column is embedded with the VM's own item table, not a table of its own
    assert "item_id" in tables
    # and a batch that lacks the fm_only features entirely runs (they are never looked up)
    batch = make_batch(seq="int4", raw=True)
    assert "secret_segment" not in batch.sparse
    model(batch)


def test_embedding_refuses_fm_only_features():
    from loopfm.vm.layers import FeatureEmbedding
    with pytest.raises(ValueError, match="fm_only"):
        FeatureEmbedding(tiny_schema().features, 4)


def test_missing_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="carries none"):
        model_for("deepfm", "int4")(make_batch(seq="none"))
    with pytest.raises(ValueError, match="raw_seq"):
        model_for("din", "none", raw=True)(make_batch(seq="none", raw=False))


def test_fm_head_starts_as_the_textbook_fm():
    model = model_for("fm", "none", kd="none")
    batch = make_batch()
    x, _ = model.fields(batch)
    pairs = sum((x[:, i] * x[:, j]).sum(-1) for i in range(x.shape[1]) for j in range(i + 1, x.shape[1]))
    expected = pairs + model.first_order(batch).sum((1, 2))
    torch.testing.assert_close(model(batch)["logit"], expected, rtol=1e-5, atol=1e-6)
    fmfm = model_for("fmfm", "none", kd="none")
    x, _ = fmfm.fields(batch)
    pairs = sum((x[:, i] * x[:, j]).sum(-1) for i in range(x.shape[1]) for j in range(i + 1, x.shape[1]))
    torch.testing.assert_close(fmfm(batch)["logit"], pairs + fmfm.first_order(batch).sum((1, 2)),
                               rtol=1e-5, atol=1e-6)


def test_config_checks():
    with pytest.raises(ValueError):
        VMModelConfig(model="xgboost")
    with pytest.raises(ValueError):
        VMModelConfig(encoder="max")
    with pytest.raises(ValueError):
        VMModelConfig(embedding_dim=0)
    with pytest.raises(ValueError):
        VMModelConfig(dropout=1.0)
