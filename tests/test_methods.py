"""The paper's four methods really change the model or the batch, alone and in every combination."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BlurPool2d
from torch.utils.flop_counter import FlopCounterMode

from methods import Context, MethodList, build
from methods.blurpool import apply_blurpool, blurred_layers
from models import build_model
from options import parse_args

PAPER_METHODS = ("blurpool", "channels_last", "label_smoothing", "mixup")


def method_list(*specs):
    return MethodList([build(s) for s in specs])


def ctx(step=0, num_classes=10, micro=0):
    return Context(step=step, epoch=0.0, rank=0, world_size=1, seed=0, run_progress=0.0, cycle_progress=0.0,
                   num_classes=num_classes, micro=micro)


def max_stride(m):
    return m.stride if isinstance(m.stride, int) else max(m.stride)


def strided(model):
    """Names of the strided convs and max-pools."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and max_stride(m) > 1]


BINOMIAL = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16


def composer_blur(x, stride):
    """Composer's blur_2d: the binomial filter per channel, zero padding 1."""
    return F.conv2d(x, BINOMIAL.repeat(x.shape[1], 1, 1, 1), stride=stride, padding=1, groups=x.shape[1])


@pytest.mark.parametrize("name,in_chans,size,stem", [("small_resnet", 1, 28, []), ("resnet18", 3, 64, ["conv1"])])
def test_blurpool_surgery(name, in_chans, size, stem):
    torch.manual_seed(0)
    plain = build_model(name, 10, in_chans).eval()
    blurred = copy.deepcopy(plain)
    replaced = apply_blurpool(blurred)
    blurred.eval()
    # every strided layer but the stem (image input, < 16 channels) is replaced, and reported by name
    assert [n for n in strided(plain) if getattr(plain.get_submodule(n), "in_channels", 16) < 16] == stem
    assert replaced == blurred_layers(blurred) == [n for n in strided(plain) if n not in stem]
    assert all(type(blurred.get_submodule(n)) is nn.Conv2d for n in stem)
    for n in replaced:
        first, second = blurred.get_submodule(n)
        original = plain.get_submodule(n)
        if isinstance(original, nn.Conv2d):  # a binomial blur at stride 1, then the conv as it was
            assert isinstance(first, BlurPool2d) and first.stride == 1 and first.channels == original.in_channels
            assert second.stride == original.stride and torch.equal(second.weight, original.weight)
        else:  # the max-pool at stride 1, then the blur with the pool's stride
            assert first.stride == 1 and isinstance(second, BlurPool2d) and second.stride == original.stride
        blur = first if isinstance(first, BlurPool2d) else second
        assert all(torch.equal(f[0], BINOMIAL) for f in blur.filt)
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        a, b = plain(x), blurred(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)  # same weights, different function


@pytest.mark.parametrize("blur_first", [True, False])
def test_blurpool_computes_composers_layers(blur_first):
    torch.manual_seed(0)
    conv, pool = nn.Conv2d(16, 8, 3, 2, 1), nn.MaxPool2d(3, 2, 1)
    model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(pool))
    assert apply_blurpool(model, blur_first=blur_first) == ["0", "1"]
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        dense = F.conv2d(x, conv.weight, conv.bias, stride=1, padding=1)
        expected = conv(composer_blur(x, 1)) if blur_first else composer_blur(dense, 2)
        torch.testing.assert_close(model[0](x), expected)
        torch.testing.assert_close(model[1](x), composer_blur(F.max_pool2d(x, 3, 1, 1), 2))


def forward_flops(model, shape):
    """Forward FLOPs as FlopCounterMode counts them (convs and matmuls), on the meta device: no compute."""
    model = model.to("meta").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


@pytest.mark.parametrize("name,shape", [("small_resnet", (1, 1, 28, 28)), ("resnet50", (1, 3, 224, 224))])
def test_blurpool_flops(name, shape):
    plain = forward_flops(build_model(name, 10, shape[1]), shape)
    blur_first = method_list("blurpool").apply_model(build_model(name, 10, shape[1]))
    # the depthwise 3x3 blurs are counted: 2 * 9 FLOPs per output element
    blur_outputs = []
    for m in blur_first.modules():
        if isinstance(m, BlurPool2d):
            m.register_forward_hook(lambda m, args, out: blur_outputs.append(out.numel()))
    with_blur = forward_flops(blur_first, shape)
    assert len(blur_outputs) == len(blurred_layers(blur_first)) > 0
    conv_first = method_list("blurpool:mode=conv-first").apply_model(build_model(name, 10, shape[1]))
    assert 1.0 < with_blur / plain <= 1.10
    assert with_blur - plain == 2 * 9 * sum(blur_outputs)  # the blur-first convs cost exactly what they did
    assert forward_flops(conv_first, shape) / plain > 1.4


def test_channels_last_model_and_batches():
    model = method_list("channels_last").apply_model(build_model("small_resnet", 10, 1))
    # 4-D weights whose two layouts differ (else both layouts coincide and the check is void)
    four_d = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in four_d)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for ls, mx in itertools.product([0.0, 0.1], [0.0, 0.2]):  # the layout survives the soft-target methods
        for channels_last in (False, True):
            obj = method_list(*["channels_last"] * channels_last, *[f"label_smoothing:eps={ls}"] * (ls > 0),
                              *[f"mixup:alpha={mx}"] * (mx > 0))
            xc, yc = obj.transform_batch(x.clone(), y, ctx())
            assert xc.is_contiguous(memory_format=torch.channels_last) is channels_last
            assert xc.is_contiguous() is not channels_last
            if not (ls or mx):
                assert torch.equal(xc, x) and torch.equal(yc, y)  # same values: only the layout changes


def test_label_smoothing_targets_and_loss():
    eps, C = 0.1, 10
    obj = method_list(f"label_smoothing:eps={eps}")
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, C, (6,))
    xp, t = obj.transform_batch(x, y, ctx(num_classes=C))
    assert torch.equal(xp, x)
    on, off = 1 - eps + eps / C, eps / C
    expected = torch.full((6, C), off)
    expected[torch.arange(6), y] = on
    torch.testing.assert_close(t, expected)
    logits = torch.randn(6, C)
    hand = -(expected * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(obj.loss(logits, t, ctx()), hand)
    assert not torch.isclose(obj.loss(logits, t, ctx()), nn.functional.cross_entropy(logits, y))


def one_hot(y, C):
    return nn.functional.one_hot(y, C).float()


def mixing_weight(x, xm):
    """The lambda solving xm = lam * x + (1 - lam) * x.flip(0), by least squares."""
    d = (x - x.flip(0)).flatten()
    return float(((xm - x.flip(0)).flatten() @ d) / (d @ d))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_batch_and_targets_are_the_same_convex_combination(eps):
    C = 10
    obj = method_list("mixup", *[f"label_smoothing:eps={eps}"] * (eps > 0))
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8) % C
    smooth = one_hot(y, C) * (1 - eps) + eps / C
    lams = []
    for step in range(200):
        xm, t = obj.transform_batch(x.clone(), y, ctx(step, C))
        lam = mixing_weight(x, xm)
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t, lam * smooth + (1 - lam) * smooth.flip(0), rtol=1e-5, atol=1e-5)
        lams.append(lam)
    lams = torch.tensor(lams)
    # lambda ~ Beta(0.2, 0.2): in [0, 1], mean 1/2, std 1 / sqrt(4 (2 alpha + 1)) = 0.423 (0 if MixUp does nothing)
    assert ((lams >= 0) & (lams <= 1)).all()
    assert abs(lams.mean() - 0.5) < 0.1 and abs(lams.std() - 0.423) < 0.03
    # lambda depends on the draw key only: the same key draws the same, another key another
    xm5, _ = obj.transform_batch(x.clone(), y, ctx(5, C))
    xm6, _ = obj.transform_batch(x.clone(), y, ctx(6, C))
    assert mixing_weight(x, xm5) == pytest.approx(lams[5].item()) and not torch.allclose(xm5, xm6)


def test_mixup_draws_what_it_drew_and_leaves_numpys_global_stream_alone():
    """MixUp seeds NumPy's global generator from the key for timm's draw; it puts the generator back after, so a
    plug-in drawing from np.random sees its own stream, not one restarted each micro-batch. Its draws are those
    of the committed studies (lambda pinned for three keys)."""
    import numpy as np
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8)
    mixup = method_list("mixup")
    lams = [mixup.transform_batch(x.clone(), y, ctx(step))[1][0, 0].item() for step in (0, 1, 7)]
    assert lams == [0.7319868803024292, 0.6799988150596619, 0.9416455626487732]  # t[0] = lam e_0 + (1 - lam) e_7
    np.random.seed(123)
    want = np.random.rand(4)
    np.random.seed(123)
    got = [np.random.rand(2)]
    for step in range(3):
        mixup.transform_batch(x.clone(), y, ctx(step))
    got.append(np.random.rand(2))
    assert np.array_equal(np.concatenate(got), want)


ALL_SETS = [combo for r in range(5) for combo in itertools.combinations(PAPER_METHODS, r)]
ALIASES = {"blurpool": "--blurpool", "channels_last": "--channels-last", "label_smoothing": "--label-smoothing",
           "mixup": "--mixup"}


@pytest.mark.parametrize("name,in_chans,size", [("small_resnet", 1, 28), ("resnet18", 3, 32)])
def test_all_sixteen_method_sets_train(name, in_chans, size):
    from timm.optim import SGDW

    from methods import selected
    from train import train_step
    assert len(ALL_SETS) == 16
    losses = {}
    torch.manual_seed(1)
    x, y = torch.randn(4, in_chans, size, size), torch.randint(0, 10, (4,))
    for combo in ALL_SETS:
        c, _ = selected(parse_args([ALIASES[m] for m in combo]))  # the old flags name the canonical methods
        assert c.specs == sorted(combo)
        torch.manual_seed(0)
        model = c.apply_model(build_model(name, 10, in_chans))
        # each method is really on, and only where asked: blurred layers, weights' memory format
        assert bool(blurred_layers(model)) == ("blurpool" in combo), combo
        conv = next(m for m in model.modules()
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == ("channels_last" in combo), combo
        before = [p.detach().clone() for p in model.parameters()]
        opt = SGDW(model.parameters(), lr=0.1, momentum=0.9)
        loss = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), c,
                          torch.autocast("cpu", enabled=False), x.clone(), y, 2, False, ctx())
        assert torch.isfinite(loss), combo
        update = torch.cat([(a - b.detach()).flatten() for a, b in zip(before, model.parameters())])
        assert update.abs().sum() > 0, combo
        losses[combo] = loss.item(), update
    for combo, (loss, update) in losses.items():  # the first step against the same set without each method
        for m in combo:
            without, update_without = losses[tuple(n for n in combo if n != m)]
            if m == "channels_last":  # the same arithmetic in another layout: the same loss and update
                assert loss == pytest.approx(without, rel=1e-4), combo
                assert (update - update_without).norm() < 1e-3 * update.norm(), combo
            else:  # blurpool changes the model, label smoothing the targets, MixUp the batch and the targets
                assert loss != pytest.approx(without, rel=1e-4), combo
                assert (update - update_without).norm() > 1e-2 * update.norm(), combo
