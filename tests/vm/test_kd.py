"""KD: the ExFM auxiliary-head scheme (target, β gradient scaling, serving independence), plain
soft-label KD, variants and config checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from loopfm.vm import KDConfig, VMModelConfig, aux_target, build_model, kd_loss, scale_grad
from loopfm.vm.kd import kd_for_variant, variant_flags
from loopfm.vm.model import MODELS
from tests.vm.util import make_batch, tiny_schema


def test_aux_target():
    soft = torch.tensor([0.0, 0.05, 0.2, 0.21, 0.9])
    torch.testing.assert_close(aux_target(soft, 5.0), torch.tensor([0.0, 0.25, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(aux_target(soft, 1.0), soft)


def test_scale_grad():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_grad(x, 5.0)
    torch.testing.assert_close(y, x)
    (g,) = torch.autograd.grad((y * torch.arange(4.0)).sum(), x)
    torch.testing.assert_close(g, 5.0 * torch.arange(4.0).expand(3, 4))


def _model(name, kd, seq="int4"):
    torch.manual_seed(0)
    cfg = VMModelConfig(model=name, embedding_dim=4, dnn=[8], attention_mlp=[8], kernel_backend="reference")
    return build_model(cfg, tiny_schema(), seq_dim=8 if seq != "none" else None, kd=kd)


@pytest.mark.parametrize("name", ["deepfm", "dmin", "fm"])
def test_beta_scales_the_aux_gradient_into_the_trunk(name):
    """d(aux loss)/d(trunk params) with β equals β × the same gradient with β = 1."""
    batch = make_batch(seq="int4")
    grads = {}
    for beta in (1.0, 5.0):
        kd = KDConfig(mode="aux_head", alpha=5.0, gamma=10.0, beta=beta)
        model = _model(name, kd)
        out = model(batch)
        aux = kd.gamma * F.binary_cross_entropy_with_logits(out["aux_logit"], aux_target(batch.soft_labels, kd.alpha))
        trunk = [p for n, p in model.named_parameters() if not n.startswith(("head.", "aux_head."))]
        grads[beta] = torch.autograd.grad(aux, trunk, allow_unused=True)
        # the aux head's own weights get the unscaled gradient, the serving head none
        gh = torch.autograd.grad(model(batch)["aux_logit"].sum(), [model.aux_head.weight, model.head.weight],
                                 allow_unused=True)
        assert gh[1] is None
    nonzero = 0
    for g1, g5 in zip(grads[1.0], grads[5.0]):
        if g1 is None:
            assert g5 is None
            continue
        torch.testing.assert_close(g5, 5.0 * g1, rtol=1e-5, atol=1e-7)
        nonzero += int(g1.abs().sum() > 0)
    assert nonzero > 3


@pytest.mark.parametrize("name", MODELS)
def test_serving_prediction_ignores_the_aux_head(name):
    model = _model(name, KDConfig(mode="aux_head")).eval()
    batch = make_batch(seq="int4")
    before = model.predict(batch)
    with torch.no_grad():
        model.aux_head.weight.normal_(std=10.0)
        model.aux_head.bias.fill_(-3.0)
    torch.testing.assert_close(model.predict(batch), before, rtol=0, atol=0)
    torch.testing.assert_close(model(batch)["logit"], torch.logit(before, eps=0), rtol=1e-4, atol=1e-4)


def test_losses():
    batch = make_batch()
    out = {"logit": torch.randn(6), "aux_logit": torch.randn(6)}
    y, s = batch.labels, batch.soft_labels
    task = F.binary_cross_entropy_with_logits(out["logit"], y)
    loss, parts = kd_loss(out, y, s, KDConfig(mode="none"))
    torch.testing.assert_close(loss, task)
    loss, parts = kd_loss(out, y, s, KDConfig(mode="aux_head", alpha=5, gamma=10, beta=5))
    aux = F.binary_cross_entropy_with_logits(out["aux_logit"], torch.clamp(5 * s, max=1))
    torch.testing.assert_close(loss, task + 10 * aux)
    assert float(parts["loss"]) == pytest.approx(float(task + 10 * aux), rel=1e-6)
    loss, _ = kd_loss(out, y, s, KDConfig(mode="soft_label", lam=0.5))
    torch.testing.assert_close(loss, task + 0.5 * F.binary_cross_entropy_with_logits(out["logit"], s))
    with pytest.raises(ValueError, match="soft labels"):
        kd_loss(out, y, None, KDConfig(mode="soft_label"))


def test_soft_label_mode_has_no_aux_head():
    model = _model("deepfm", KDConfig(mode="soft_label"))
    assert model.aux_head is None and "aux_logit" not in model(make_batch(seq="int4"))


def test_variants_and_config():
    assert variant_flags("baseline") == (False, False)
    assert variant_flags("kd") == (True, False)
    assert variant_flags("loopfm") == (False, True)
    assert variant_flags("kd+loopfm") == (True, True)
    with pytest.raises(ValueError, match="variant"):
        variant_flags("loopfm+kd")
    kd = KDConfig()
    assert (kd.mode, kd.alpha, kd.gamma, kd.beta) == ("aux_head", 5.0, 10.0, 5.0)
    assert kd_for_variant("loopfm", kd).mode == "none" and kd_for_variant("kd", kd) is kd
    with pytest.raises(ValueError, match="needs KD"):
        kd_for_variant("kd", KDConfig(mode="none"))
    for bad in ({"mode": "hint"}, {"alpha": -1.0}, {"beta": float("nan")}):
        with pytest.raises(ValueError):
            KDConfig(**bad)
    assert dataclasses.fields(KDConfig)[0].metadata["help"]
