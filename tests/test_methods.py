"""Each method really changes the model or the batch, alone and in every combination."""
import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from timm.layers import BlurPool2d

from methods import METHOD_NAMES, Objective, prepare_model, selected_methods
from methods.blurpool import apply_blurpool
from models import build_model


def cfg(**kw):
    base = dict(blurpool=False, channels_last=False, label_smoothing=0.0, mixup=0.0, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def strided(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
            and max((m.stride,) if isinstance(m.stride, int) else m.stride) > 1]


@pytest.mark.parametrize("name,in_chans,size", [("small_resnet", 1, 28), ("resnet18", 3, 64)])
def test_blurpool_surgery(name, in_chans, size):
    torch.manual_seed(0)
    plain = build_model(name, 10, in_chans).eval()
    before = strided(plain)
    blurred = copy.deepcopy(plain)
    replaced = apply_blurpool(blurred)
    blurred.eval()
    stem = [m for m in before if isinstance(m, nn.Conv2d) and m.in_channels < 16]
    assert replaced == len(before) - len(stem) > 0
    # nothing strided is left but the stem conv, and every replaced layer is followed by a blur
    assert [m for m in strided(blurred)] == [m for m in strided(blurred) if isinstance(m, BlurPool2d)] + \
        [m for m in strided(blurred) if isinstance(m, nn.Conv2d) and m.in_channels < 16]
    seqs = [m for m in blurred.modules() if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], BlurPool2d)]
    assert len(seqs) == replaced and all(s[0].stride in ((1, 1), 1) for s in seqs)
    binomial = torch.tensor([1.0, 2.0, 1.0])
    expected = (binomial[:, None] * binomial[None, :]) / 16
    for s in seqs:
        filt = s[1].filt
        assert torch.allclose(filt[0, 0], expected)
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        a, b = plain(x), blurred(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)  # same weights, different function


def test_channels_last_model_and_batches():
    model = prepare_model(build_model("small_resnet", 10, 1), cfg(channels_last=True))
    four_d = [p for p in model.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in four_d
                          if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1)  # else both layouts coincide
    obj = Objective(cfg(channels_last=True), 10)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    xc, yc = obj.prepare(x, y, (0, 0, 0))
    assert xc.is_contiguous(memory_format=torch.channels_last) and not xc.is_contiguous()
    assert torch.equal(xc, x) and torch.equal(yc, y)  # same values: only the layout changes


def test_label_smoothing_targets_and_loss():
    eps, C = 0.1, 10
    obj = Objective(cfg(label_smoothing=eps), C)
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, C, (6,))
    xp, t = obj.prepare(x, y, (0, 0, 0))
    assert torch.equal(xp, x)
    on, off = 1 - eps + eps / C, eps / C
    expected = torch.full((6, C), off)
    expected[torch.arange(6), y] = on
    torch.testing.assert_close(t, expected)
    logits = torch.randn(6, C)
    hand = -(expected * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(obj.loss(logits, t), hand)
    assert not torch.isclose(obj.loss(logits, t), nn.functional.cross_entropy(logits, y))


def one_hot(y, C):
    return nn.functional.one_hot(y, C).float()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_batch_and_targets_are_the_same_convex_combination(eps):
    C = 10
    obj = Objective(cfg(mixup=0.2, label_smoothing=eps), C)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8) % C
    xm, t = obj.prepare(x.clone(), y, (5, 0, 0))
    # solve x_mixed = lam * x + (1 - lam) * x.flip(0) for lam
    d = (x - x.flip(0)).flatten()
    lam = float(((xm - x.flip(0)).flatten() @ d) / (d @ d))
    assert 0 < lam < 1 and abs(lam - 0.5) > 1e-6 or lam == pytest.approx(1.0)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0), rtol=1e-5, atol=1e-5)
    smooth = one_hot(y, C) * (1 - eps) + eps / C
    torch.testing.assert_close(t, lam * smooth + (1 - lam) * smooth.flip(0), rtol=1e-5, atol=1e-5)
    # lambda depends on the draw key only: the same key draws the same, another key another
    xm2, _ = obj.prepare(x.clone(), y, (5, 0, 0))
    xm3, _ = obj.prepare(x.clone(), y, (6, 0, 0))
    assert torch.equal(xm, xm2) and not torch.allclose(xm, xm3)


ALL_SETS = [combo for r in range(5) for combo in itertools.combinations(METHOD_NAMES, r)]


@pytest.mark.parametrize("name,in_chans,size", [("small_resnet", 1, 28), ("resnet18", 3, 32)])
def test_all_sixteen_method_sets_train(name, in_chans, size):
    from timm.optim import SGDW

    from train import train_step
    assert len(ALL_SETS) == 16
    for combo in ALL_SETS:
        c = cfg(blurpool="blurpool" in combo, channels_last="channels_last" in combo,
                label_smoothing=0.1 if "label_smoothing" in combo else 0.0, mixup=0.2 if "mixup" in combo else 0.0)
        assert selected_methods(c) == sorted(combo)
        torch.manual_seed(0)
        model = prepare_model(build_model(name, 10, in_chans), c)
        before = [p.detach().clone() for p in model.parameters()]
        opt = SGDW(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(4, in_chans, size, size), torch.randint(0, 10, (4,))
        loss = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), Objective(c, 10),
                          torch.autocast("cpu", enabled=False), x, y, 2, False, (0, 0))
        assert torch.isfinite(loss), combo
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), combo
