"""Optimizers from timm (--opt), weight-decay parameter groups, gradient clipping, methods that do not fit the
model, and a tiny ViT through the whole pipeline."""
import json
import subprocess
import sys

import pytest
import torch
from timm.optim import SGDW

from conftest import ENV, ROOT, TINY, one_step_change, run_train

VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
       "img_size=32,patch_size=8,depth=2,embed_dim=64,num_heads=2", "--opt", "adamw", "--lr", "1e-3", "--weight-decay",
       "5e-5"]


def build(argv, model):
    import options
    import train
    args = options.parse_args(argv)
    return train.build_optimizer(model, args, None, None, train.decay_exclusions(args, model))


def small_vit():
    from models import build_model, parse_model_kwargs
    return build_model("vit_tiny_patch16_224", 10, 3, parse_model_kwargs(VIT[3]))


def test_lamb_leaves_clipping_to_clip_grad():
    optimizer = build(["--opt", "lamb"], small_vit())
    assert optimizer.defaults["max_grad_norm"] is None and optimizer.param_groups[0]["decoupled_decay"] is True


@pytest.mark.parametrize("opt,cls", [("sgdw", "SGDW"), ("adamw", "AdamW"), ("lamb", "Lamb"), ("lion", "Lion")])
def test_each_optimizer_spares_biases_and_norm_weights_where_asked(opt, cls):
    vit = small_vit()
    no_decay = {id(p) for n, p in vit.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}
    for exclusions in ("auto", "on", "off"):  # auto: on for a model without BatchNorm
        optimizer = build(["--opt", opt, "--decay-exclusions", exclusions, "--lr", "0.1", "--weight-decay", "0.01"],
                          vit)
        assert type(optimizer).__name__ == cls
        decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert len(decays) == len(list(vit.parameters()))
        if exclusions == "off":
            assert set(decays.values()) == {0.01 / 0.1}
        else:
            assert {i for i, wd in decays.items() if wd == 0} == no_decay and len(no_decay) > 10
            assert {wd for i, wd in decays.items() if i not in no_decay} == {0.01 / 0.1}


def test_convnets_decay_every_parameter_by_default_as_before():
    from models import build_model
    model = build_model("small_resnet", 10, 1)
    optimizer = build([], model)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 5e-4 / 0.4


def test_opt_sgdw_is_the_sgdw_of_before_step_for_step():
    """Today's default through timm's factory: the same optimizer, bit for bit, as SGDW built directly."""
    from models import build_model
    torch.manual_seed(0)
    a = build_model("small_resnet", 10, 1)
    b = build_model("small_resnet", 10, 1)
    b.load_state_dict(a.state_dict())
    new = build(["--nesterov"], a)
    old = SGDW(b.parameters(), lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4 / 0.4)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, optimizer in ((a, new), (b, old)):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_clipping_under_a_gradscaler_takes_its_scale_out_first():
    """fp16's GradScaler (here enabled on fp32 at a fixed scale of 1024, which a CPU allows): the gradient is
    unscaled before it is clipped, so the step is the unscaled one, of norm exactly --clip-grad."""
    from methods import MethodList
    from train import train_step

    from conftest import step_context

    def step(scale):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
        before = [p.detach().clone() for p in net.parameters()]
        g = torch.Generator().manual_seed(1)
        x, y = 50 * torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 4, (8,), generator=g)
        scaler = torch.amp.GradScaler("cpu", enabled=scale is not None, init_scale=scale or 1.0,
                                      growth_interval=10 ** 6)
        train_step(net, torch.optim.SGD(net.parameters(), lr=1.0), scaler, MethodList([]),
                   torch.autocast("cpu", enabled=False), x, y, 2, False, step_context(num_classes=4), clip_grad=0.5)
        return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
    plain, scaled = step(None), step(1024.0)
    assert plain.norm().item() == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-7)


def test_clipping_bounds_the_global_norm_of_the_all_reduced_accumulated_gradient(tmp_path):
    """2 gloo ranks x 2 micro-steps against one process on the whole batch: the same step, of norm exactly
    --clip-grad (the raw gradient is far larger), so the norm was taken over the all-reduced, whole gradient."""
    steps = {(world, clip): one_step_change(tmp_path, world, clip=clip) for world, clip in ((1, 0.0), (1, 0.5),
                                                                                             (2, 0.5))}
    raw = steps[(1, 0.0)]
    assert raw.norm() > 5  # unclipped: far above the bound
    assert steps[(1, 0.5)].norm().item() == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(steps[(1, 0.5)], raw * 0.5 / raw.norm(), rtol=1e-5, atol=1e-7)  # the direction kept
    torch.testing.assert_close(steps[(2, 0.5)], steps[(1, 0.5)], rtol=1e-5, atol=1e-7)


def test_a_tiny_vit_trains_both_curves_and_a_method_that_does_not_fit_says_so(tmp_path):
    """AdamW with exclusions and clipping on a 2-layer ViT, cyclic and standard, through analysis.compare;
    BlurPool has nothing to blur in a ViT: one line, and config.json says so."""
    common = TINY + VIT + ["--clip-grad", "1.0", "--blurpool", "--eval-every", "0", "--amp", "none"]  # pinned
    cyc = run_train(common + ["--run-dir", str(tmp_path / "vit" / "cyclic")])
    for e in ("2", "4"):
        run_train(common + ["--schedule", "standard", "--epochs", e, "--run-dir", str(tmp_path / "vit" / f"std{e}")])
    assert "warning: method blurpool changed nothing in vit_tiny_patch16_224" in cyc.stdout
    config = json.loads((tmp_path / "vit" / "cyclic" / "config.json").read_text())
    assert config["methods_without_effect"] == ["blurpool"] and config["decay_excluded"] is True
    assert config["opt"] == "adamw" and config["clip_grad"] == 1.0
    p = subprocess.run([sys.executable, "-m", "analysis.compare", str(tmp_path / "vit"), "--out", str(tmp_path / "out"),
                        "--metric", "final"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    gaps = (tmp_path / "out" / "gaps.csv").read_text().splitlines()
    assert len(gaps) == 2 and gaps[1].startswith("blurpool,2,")  # one method set, two matched budgets


@pytest.mark.parametrize("opt", ["sgdw", "adamw"])
def test_schedule_free_takes_its_variant_and_spares_what_the_others_spare(opt):
    """The same parameters without decay as the standard runs' optimizer (a ViT's position embedding and class
    token too); AdamW's decay per step at its peak LR is --weight-decay, as for every --opt."""
    import schedulefree

    import options
    import train
    flags = ["--schedule", "schedule-free", "--opt", opt] + (["--opt-betas", "0.9", "0.95"] * (opt == "adamw"))
    args = options.parse_args(flags)
    setup, _ = options.resolve(args, 1, torch.device("cpu"))
    vit = small_vit()
    optimizer = train.build_optimizer(vit, args, setup, type("P", (), {"warmup_steps": 5})(), exclusions=True)
    cls = schedulefree.AdamWScheduleFree if opt == "adamw" else schedulefree.SGDScheduleFree
    assert isinstance(optimizer, cls)
    spared = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert spared == {id(p) for n, p in vit.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}
    decay = max(g["weight_decay"] for g in optimizer.param_groups)
    assert decay == (5e-4 / setup.sf_lr if opt == "adamw" else 5e-4)  # SGD's: its L2 term, as the study ran it
    if opt == "adamw":
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_model_kwargs_reach_the_model():
    """patch_size changes the number of tokens; drop_path_rate the blocks' drop-path (timm's own modules)."""
    from models import build_model, parse_model_kwargs
    tokens = {}
    for patch in (4, 8):
        kwargs = parse_model_kwargs(f"img_size=32,patch_size={patch},depth=2,embed_dim=32,num_heads=2,"
                                    f"drop_path_rate=0.2")
        vit = build_model("vit_tiny_patch16_224", 10, 3, kwargs)
        tokens[patch] = vit.patch_embed.num_patches
        assert len(vit.blocks) == 2 and vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # linear rule
    assert tokens == {4: 64, 8: 16}


def test_lamb_takes_its_trust_ratio_without_weight_decay_too():
    """timm's Lamb took the trust ratio only where weight decay was on: --weight-decay 0 trained as plain Adam.
    Now each parameter's step is lr x ||w|| (the update scaled to the weights' norm), and not Adam's."""
    from models import build_model
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    adam = torch.optim.Adam([p.detach().clone().requires_grad_() for p in model.parameters()], lr=0.01, eps=1e-6)
    for p, q in zip(model.parameters(), adam.param_groups[0]["params"]):
        q.grad = p.grad.clone()
    adam.step()
    build(["--opt", "lamb", "--lr", "0.01", "--weight-decay", "0"], model).step()
    for p, b, a in zip(model.parameters(), before, adam.param_groups[0]["params"]):
        if b.norm() > 0 and p.grad.norm() > 0:  # timm: a ratio of 1 where a norm is 0
            assert (p.detach() - b).norm().item() == pytest.approx(0.01 * b.norm().item(), rel=1e-4)
            if p.ndim > 1:  # (BatchNorm's weights of ones: Adam's first step, ~lr per entry, has that norm too)
                assert not torch.allclose(p.detach() - b, a.detach() - b, rtol=1e-3, atol=0)


def test_lamb_runs_record_their_version_and_older_ones_stay_apart(tmp_path):
    """config.json's lamb_version (2); a lamb run without it took the old update: it counts as null, is not
    resumed with the new one, and is another group in the analysis."""
    import os
    import shutil

    from analysis.runs import load_runs
    args = TINY + ["--opt", "lamb", "--lr", "0.01", "--weight-decay", "0", "--cycles", "1", "--eval-every", "0",
                   "--amp", "none"]
    new, old = tmp_path / "runs" / "new", tmp_path / "runs" / "old"
    run_train(args + ["--run-dir", str(new)])
    assert json.loads((new / "config.json").read_text())["lamb_version"] == 2
    shutil.copytree(new, old)
    config = json.loads((old / "config.json").read_text())
    del config["lamb_version"]
    (old / "config.json").write_text(json.dumps(config))
    last = old / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]["lamb_version"]
    torch.save(ckpt, last)
    runs = {os.path.basename(r.path): r for r in load_runs([str(tmp_path / "runs")])}
    assert runs["old"].option("lamb_version") is None and runs["new"].option("lamb_version") == 2
    assert runs["old"].family != runs["new"].family
    os.remove(old / "done")
    p = run_train(args + ["--run-dir", str(old), "--resume"], check=False)
    assert p.returncode == 2 and "lamb_version: None -> 2" in p.stderr
