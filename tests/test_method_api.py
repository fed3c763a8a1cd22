"""The method API: a user's plug-in end to end, the registry's specs, the hooks' order and composition, and the five
methods built on it (EMA, stochastic depth, CutMix, SAM, progressive resizing) each really changing the computation."""
import json
import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from timm.data import Mixup

import methods
from conftest import ROOT, TINY, one_step_change, run_train, step_context
from methods import Context, Method, MethodError, MethodList, build
from models import build_model

TIME_COLUMNS = {"train_time_s", "curve_cost_s", "images_per_s", "eval_time_s", "startup_s"}

USER_METHOD = '''
import torch
from methods import Method, MethodError

class PixelDrop(Method):
    """Zero each pixel with probability p, drawn from the micro-batch's key."""
    name, options = "pixel_drop", {"p": 0.25}

    def check(self, run):
        if not 0 <= self.p < 1:
            raise MethodError(f"--method pixel_drop: p must be in [0, 1), got {self.p}")

    def transform_batch(self, x, y, ctx):
        keep = torch.rand(x.shape, generator=ctx.generator(x.device), device=x.device) >= self.p
        return x * keep, y
'''


def rows(run):
    import csv
    with open(os.path.join(run, "metrics.csv")) as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def weights(run):
    return torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["model"]


def resume_from_previous_checkpoint(ref, run, args):
    """The finished run `ref`, copied to `run` without its last checkpoint, resumed: it must end identical."""
    shutil.copytree(ref, run)
    os.remove(os.path.join(run, "done"))
    os.remove(os.path.join(run, "checkpoints", "last.pt"))
    p = run_train(args + ["--run-dir", run, "--resume"])
    assert "resumed at step" in p.stdout
    assert rows(run) == rows(ref)
    a, b = weights(run), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_users_method_from_a_file_trains_records_itself_and_resumes_exactly(tmp_path):
    plugin = tmp_path / "elsewhere" / "my_aug.py"
    plugin.parent.mkdir()
    plugin.write_text(USER_METHOD)
    args = TINY + ["--amp", "none", "--eval-every", "1", "--plugins", str(plugin), "--method", "pixel_drop:p=0.5"]
    ref = str(tmp_path / "ref")
    run_train(args + ["--run-dir", ref])
    cfg = json.load(open(os.path.join(ref, "config.json")))
    assert cfg["methods"] == ["pixel_drop:p=0.5"]
    assert cfg["plugins"] == {"pixel_drop": "sha256:" + __import__("hashlib").sha256(plugin.read_bytes()).hexdigest()}
    base = str(tmp_path / "base")
    run_train(TINY + ["--amp", "none", "--eval-every", "1", "--run-dir", base])
    assert rows(ref) != rows(base)  # it changed the training
    resume_from_previous_checkpoint(ref, str(tmp_path / "run"), args)
    # the analysis sees it as its own method set
    from analysis.runs import load_runs
    runs = load_runs([str(tmp_path)])
    assert sorted(r.methods for r in runs) == ["baseline", "pixel_drop:p=0.5", "pixel_drop:p=0.5"]
    from analysis.runs import group_runs
    assert len(group_runs(runs)) == 1  # one family: the plug-in set is compared with the baseline
    # a changed plug-in file is not resumed into the old run
    changed = str(tmp_path / "changed")
    shutil.copytree(ref, changed)
    os.remove(os.path.join(changed, "done"))
    plugin.write_text(USER_METHOD + "\n# edited\n")
    p = run_train(args + ["--run-dir", changed, "--resume"], check=False)
    assert p.returncode == 2 and "plugins: {'pixel_drop': 'sha256:" in p.stderr


COUNTER = '''
from methods import Method

class Counter(Method):
    """Halves every other micro-batch, counting its calls in its state."""
    name = "counter"

    def __init__(self, **options):
        super().__init__(**options)
        self.n = 0

    def transform_batch(self, x, y, ctx):
        self.n += 1
        return x * (1.0 if self.n % 2 else 0.5), y

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]
'''


def test_a_stateful_plug_in_resumes_exactly_the_start_up_pass_counts_nothing(tmp_path):
    """Every process start runs one trial pass through transform_batch (compilation, FLOPs): a method's state is
    put back after it, or a resumed run would count one call more than the uninterrupted one."""
    (tmp_path / "counter.py").write_text(COUNTER)
    args = TINY + ["--eval-every", "1", "--plugins", str(tmp_path / "counter.py"), "--method", "counter"]
    ref = str(tmp_path / "ref")
    run_train(args + ["--run-dir", ref])
    resume_from_previous_checkpoint(ref, str(tmp_path / "run"), args)


def test_a_plug_in_check_refuses_bad_options_in_one_line(tmp_path):
    plugin = tmp_path / "my_aug.py"
    plugin.write_text(USER_METHOD)
    run = tmp_path / "run"
    p = run_train(TINY + ["--plugins", str(plugin), "--method", "pixel_drop:p=1.5", "--run-dir", str(run)],
                  check=False)
    assert p.returncode == 2 and p.stderr.strip() == "train.py: error: --method pixel_drop: p must be in [0, 1), got 1.5"
    assert not run.exists()


def test_specs_are_canonical_and_name_the_options():
    assert build("sam:rho=0.05").spec == "sam"  # the default is not written
    assert build("label_smoothing:eps=0.10").spec == "label_smoothing"
    assert build("cutmix:switch_prob=0.3,mixup_alpha=0.8").spec == "cutmix:mixup_alpha=0.8,switch_prob=0.3"
    assert build("ema:warmup=false").spec == "ema:warmup=false"
    assert build("progressive_resizing:size_increment=2").spec == "progressive_resizing:size_increment=2"
    with pytest.raises(MethodError, match="--method sam: rho is given twice"):
        build("sam:rho=0.1,rho=0.2")
    with pytest.raises(MethodError, match="not key=value"):
        build("sam:0.1")


def test_old_runs_are_read_with_the_apis_names():
    from analysis.runs import canonical_methods
    old = {"methods": ["blurpool", "label_smoothing", "mixup"], "label_smoothing": 0.2, "mixup": 0.2,
           "blurpool_mode": "conv-first"}
    assert canonical_methods(old) == ["blurpool:mode=conv-first", "label_smoothing:eps=0.2", "mixup"]
    assert canonical_methods({"methods": ["label_smoothing"], "label_smoothing": 0.1}) == ["label_smoothing"]
    # for each legacy method, the analysis' default is the method's own
    from analysis.runs import LEGACY_METHOD_OPTIONS
    for name, (_, option, default) in LEGACY_METHOD_OPTIONS.items():
        assert methods.REGISTRY[name].options[option] == default


def test_train_py_names_no_method_and_each_method_has_its_file():
    text = open(os.path.join(ROOT, "train.py")).read()
    for name, cls in methods.REGISTRY.items():
        assert not re.search(rf"\b{name}\b", text), name
        if cls in methods.BUILT_IN:
            assert cls.__module__ == f"methods.{name}"


class Recorder(Method):
    name, order = "recorder", 15

    def __init__(self, log, tag, **kw):
        super().__init__(**kw)
        self.log, self.tag = log, tag

    def transform_batch(self, x, y, ctx):
        self.log.append((self.tag, "batch"))
        return x + 1, y

    def loss(self, logits, targets, ctx, base_loss):
        self.log.append((self.tag, "loss"))
        return base_loss(logits, targets) * 2 if self.tag == "a" else base_loss(logits, targets) + 1


def test_hooks_fire_in_order_and_losses_compose():
    log = []
    a, b = Recorder(log, "a"), Recorder(log, "b")
    a.order, b.order = 5, 25
    ms = MethodList([b, a])
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    xt, _ = ms.transform_batch(x, y, step_context())
    assert torch.equal(xt, x + 2) and log == [("a", "batch"), ("b", "batch")]
    logits = torch.randn(2, 3)
    plain = torch.nn.functional.cross_entropy(logits, y)
    # b (later) wraps a: (2 x CE) + 1
    torch.testing.assert_close(ms.loss(logits, y, step_context()), 2 * plain + 1)


def test_label_smoothing_then_mixup_is_timms_mixup_with_smoothing_to_the_bit():
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
    ms = MethodList([build("mixup"), build("label_smoothing")])
    for step in range(20):
        ctx = step_context(step)
        xm, tm = ms.transform_batch(x.clone(), y, ctx)
        np.random.seed(hash((0, step, 0, 0)) & 0xFFFF_FFFF)  # the draw the method seeds from the key
        xt, tt = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.1,
                       num_classes=10)(x.clone(), y)
        assert torch.equal(xm, xt) and torch.equal(tm, tt)


def test_mixup_and_cutmix_together_are_refused_and_cutmix_mixes_boxes():
    with pytest.raises(MethodError, match="cutmix:mixup_alpha"):
        MethodList([build("mixup"), build("cutmix")])
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8)
    cm = MethodList([build("cutmix")])
    kinds = set()
    for step in range(10):
        xm, t = cm.transform_batch(x.clone(), y, step_context(step))
        changed = (xm != x).any(dim=(0, 1))  # the pixels taken from the reversed batch: one box
        rows_, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if len(rows_):
            box = (rows_.max() - rows_.min() + 1) * (cols.max() - cols.min() + 1)
            assert changed.sum() == box  # a rectangle
            lam = 1 - box.item() / 256
            torch.testing.assert_close(t[0], lam * torch.eye(10)[0] + (1 - lam) * torch.eye(10)[7])
            kinds.add("box")
    assert kinds == {"box"}
    both = MethodList([build("cutmix:mixup_alpha=0.8,switch_prob=0.5")])
    for step in range(40):  # timm's switching: some micro-batches are box-mixed, others blended everywhere
        xm, _ = both.transform_batch(x.clone(), y, step_context(step))
        frac = (xm != x).float().mean().item()
        kinds.add("blend" if frac == 1.0 else "box" if frac > 0 else "none")
    assert {"box", "blend"} <= kinds


def test_ema_averages_weights_and_batchnorm_statistics_with_its_decay_and_evaluates_both():
    """decay 0.8, where decay and 1 - decay differ: after every parameter and BatchNorm statistic went w0 + 1, + 2,
    + 3, the average is timm's (the first update copies), for the buffers as for the weights; evaluation loads
    both, and puts the live ones back bit for bit; the state resumes."""
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1)
    ema = build("ema:decay=0.8,warmup=false")
    ms = MethodList([ema])
    ms.apply_model(model)
    floats = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)
    first = {k: model.state_dict()[k].clone() for k in floats}
    for step in range(3):  # every float tensor, weights and BatchNorm statistics, w0 + 1, + 2, + 3 after each step
        with torch.no_grad():
            for k in floats:
                model.state_dict()[k].add_(1.0)
        ms.after_step(model, None, step_context(step))
    expected = {k: ((w0 + 1) * 0.8 + (w0 + 2) * 0.2) * 0.8 + (w0 + 3) * 0.2 for k, w0 in first.items()}
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ms.eval_weights(model):
        for k in floats:
            torch.testing.assert_close(model.state_dict()[k], expected[k], msg=k)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())  # put back bit for bit
    state = ms.state_dict()
    other = MethodList([build("ema:decay=0.8,warmup=false")])
    other.apply_model(build_model("small_resnet", 10, 1))
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.all[0].ema.module.state_dict().values(),
                                                  ema.ema.module.state_dict().values()))


def test_stochastic_depth_reaches_the_small_resnet_and_timm_models():
    sd = build("stochastic_depth:rate=0.2")
    assert MethodList([sd]).model_kwargs() == {"drop_path_rate": 0.2}
    model = MethodList([sd]).apply_model(build_model("small_resnet", 10, 1, sd.model_kwargs()))
    rates = [m.drop_prob for m in model.modules() if isinstance(m, __import__("timm").layers.DropPath)]
    assert rates == pytest.approx([0.1, 0.2]) and sd.no_effect is None  # linear in depth; the first block 0
    plain = build_model("small_resnet", 10, 1)
    assert MethodList([build("stochastic_depth")]).apply_model(plain) is plain and \
        not any(isinstance(m, __import__("timm").layers.DropPath) for m in plain.modules())


def test_drop_path_drops_whole_samples_rescales_the_kept_and_is_off_at_evaluation():
    """In training each sample's residual branch is either 0 or itself / keep (the expectation kept); in evaluation
    the model is exactly the same weights without stochastic depth."""
    from timm.layers import DropPath
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1, {"drop_path_rate": 0.5})
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m.drop_prob, i[0], o)))
             for m in model.modules() if isinstance(m, DropPath)]
    x = torch.randn(64, 1, 28, 28)
    model.train()
    model(x)
    assert len(seen) == 2
    for p, inp, out in seen:
        keep = 1 - p
        kept = (out == 0).flatten(1).all(1).logical_not()
        assert 0 < kept.sum() < len(x)  # some samples dropped, some kept
        torch.testing.assert_close(out[kept], inp[kept] / keep)
        assert (out[~kept] == 0).all()
    for h in hooks:
        h.remove()
    plain = build_model("small_resnet", 10, 1)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x)) and torch.equal(model(x), model(x))


def sam_step(grad_accum=1, scale=None, extra=()):
    """One SAM step of train.py's train_step on a tiny linear model with plain SGD (lr 1), with the `extra`
    methods: the weights' change."""
    from train import train_step
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 4, (8,), generator=g)
    before = [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", enabled=scale is not None, init_scale=scale or 1.0)
    train_step(net, opt, scaler, MethodList([build("sam:rho=0.5"), *extra]), torch.autocast("cpu", enabled=False),
               x, y, grad_accum, False, step_context(num_classes=4))
    return [b - p.detach() for b, p in zip(before, net.parameters())], (net, before, x, y)


def test_sam_updates_with_the_gradient_at_the_perturbed_weights():
    change, (net, before, x, y) = sam_step()
    with torch.no_grad():
        for p, b in zip(net.parameters(), before):
            p.copy_(b)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    g1 = torch.autograd.grad(loss, list(net.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(net.parameters(), g1):
            p.add_(0.5 * g / norm)
    g2 = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), list(net.parameters()))
    for c, g, plain in zip(change, g2, g1):
        torch.testing.assert_close(c, g)  # SGD lr 1: the change is the perturbed gradient
        assert not torch.allclose(c, plain)
    for a, b in zip(change, sam_step(grad_accum=2)[0]):  # accumulated: the same mean gradient, perturbed alike
        torch.testing.assert_close(a, b)
    for a, b in zip(change, sam_step(scale=1024.0)[0]):  # fp16's loss scale cancels out of the perturbation
        torch.testing.assert_close(a, b)


class GradHook(Method):
    """A before_step at `order`: keeps the gradient it sees, and zeroes it where asked."""
    name = "grad_hook"

    def __init__(self, order, zero=False):
        super().__init__()
        self.order, self.zero, self.seen = order, zero, None

    def before_step(self, model, optimizer, ctx):
        self.seen = [p.grad.clone() for p in model.parameters()]
        if self.zero:
            for p in model.parameters():
                p.grad.zero_()


def test_a_before_step_after_sam_sees_and_edits_the_gradient_the_update_uses():
    """SAM (order 70) replaces the gradient: a hook at 75 sees the second pass's (SGD lr 1: the step taken) and
    its edit is the update's; a hook at 50 edits only the gradient SAM perturbs along, and a warning says so."""
    change, _ = sam_step()
    after = GradHook(75)
    for a, b, seen in zip(change, sam_step(extra=[after])[0], after.seen, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(seen, a)  # the second-pass gradient
    assert all(not c.any() for c in sam_step(extra=[GradHook(75, zero=True)])[0])  # its zeroed gradient: no step
    assert all(c.abs().sum() > 0 for c in sam_step(extra=[GradHook(50, zero=True)])[0])  # SAM's gradient anyway
    assert MethodList([build("sam"), GradHook(75)]).warnings() == []
    assert MethodList([build("sam"), GradHook(50)]).warnings() == [
        "method grad_hook's before_step (order 50) runs before sam's (order 70), which recomputes the gradient: what "
        "grad_hook does to the gradient does not reach the update (give it an order above 70 to change the gradient "
        "the update uses)"]


def test_train_py_warns_in_one_line_of_a_before_step_ordered_before_sam(tmp_path):
    plugin = tmp_path / "zero_grad.py"
    plugin.write_text("from methods import Method\n\nclass ZeroGrad(Method):\n    name = 'zero_grad'\n\n"
                      "    def before_step(self, model, optimizer, ctx):\n        optimizer.zero_grad()\n")
    args = TINY + ["--amp", "none", "--eval-every", "0", "--plugins", str(plugin), "--method", "zero_grad"]
    alone = run_train(args + ["--run-dir", str(tmp_path / "alone")]).stdout
    with_sam = run_train(args + ["--method", "sam", "--run-dir", str(tmp_path / "sam")]).stdout
    assert "warning" not in alone
    assert [line for line in with_sam.splitlines() if "warning" in line] == [
        "warning: method zero_grad's before_step (order 50) runs before sam's (order 70), which recomputes the "
        "gradient: what zero_grad does to the gradient does not reach the update (give it an order above 70 to "
        "change the gradient the update uses)"]


def test_sams_second_pass_sees_the_same_augmented_batch():
    """MixUp mixes its micro-batch in place: the rerun must start from the raw batch and draw the same lambda."""
    from train import train_step
    seen = []

    class Spy(Method):
        name, order = "spy", 60

        def transform_batch(self, x, y, ctx):
            seen.append((x.clone(), y.clone()))
            return x, y
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,))
    raw = x.clone()
    train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
               MethodList([build("mixup"), build("sam"), Spy()]), torch.autocast("cpu", enabled=False), x, y, 2,
               False, step_context(num_classes=4))
    assert len(seen) == 4  # two micro-batches, twice
    for (a, ta), (b, tb) in zip(seen[:2], seen[2:]):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(seen[0][0], raw[:4]) and torch.equal(x, raw)  # mixed, and the loop's batch untouched


def test_sam_perturbs_with_the_all_reduced_gradient_under_ddp(tmp_path):
    """2 gloo ranks, 4 images each in 2 micro-steps, equal one process over the 8: only if the perturbation uses
    the all-reduced gradient (a rank's own would move each rank's weights elsewhere)."""
    one, two = (one_step_change(tmp_path, world, methods=["sam:rho=0.5"]) for world in (1, 2))
    torch.testing.assert_close(one, two)
    assert not torch.allclose(one, one_step_change(tmp_path, 1))  # SAM's step is not the plain one


def test_sams_second_pass_leaves_the_batchnorm_statistics_of_the_first():
    """The running statistics after a SAM step are those of the loop's own forward pass: the same as after a plain
    step on the same batch (the second pass, at the perturbed weights, is put back)."""
    from train import train_step

    def stepped(specs):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.BatchNorm1d(6),
                                  torch.nn.Linear(6, 4))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 4, (8,), generator=g)
        train_step(net, torch.optim.SGD(net.parameters(), lr=1.0), torch.amp.GradScaler("cpu", enabled=False),
                   MethodList([build(s) for s in specs]), torch.autocast("cpu", enabled=False), x, y, 2, False,
                   step_context(num_classes=4))
        return net[2]
    sam, plain = stepped(["sam:rho=0.5"]), stepped([])
    assert int(sam.num_batches_tracked) == 2  # two micro-batches, one pass
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(sam, name), getattr(plain, name), rtol=0, atol=0)


def test_each_rank_draws_its_own_randomness_and_a_rank_the_same_again():
    """The key holds the rank: under DDP every rank mixes its own micro-batch with its own lambda and box, and its
    plug-ins draw their own numbers; the same rank, step and micro-batch draw the same again (resume)."""
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 4

    def draws(rank):
        ctx = replace(step_context(step=5, rank=rank, world_size=2, num_classes=4), micro=1)
        mixed = [MethodList([build(s)]).transform_batch(x.clone(), y.clone(), ctx)[1] for s in ("mixup", "cutmix")]
        return torch.rand(4, generator=ctx.generator()), *mixed
    zero, one = draws(0), draws(1)
    assert all(torch.equal(a, b) for a, b in zip(zero, draws(0)))
    assert all(not torch.equal(a, b) for a, b in zip(zero, one))


def test_progressive_resizing_sizes_and_its_ramp_per_budget():
    pr = build("progressive_resizing")
    assert [pr.size(28, p) for p in (0.0, 0.49, 0.65, 0.79, 0.8, 0.99)] == [16, 16, 20, 28, 28, 28]
    assert [pr.size(224, p) for p in (0.0, 0.65, 0.8)] == [112, 168, 224]
    import schedules
    plan = schedules.make_plan("cyclic", 8, 1, 1, 2, 8)  # warmup 8 steps, cycles of 8, 16, 32: points 16, 32, 64
    progress = [plan.budget_progress(s) for s in range(64)]
    assert progress[0] == progress[16] == progress[32] == 0.0  # each budget ramps from its start
    assert progress[15] == 15 / 16 and progress[31] == 15 / 16 and progress[63] == 31 / 32
    sizes = [pr.size(28, p) for p in progress]
    assert sizes[15] == sizes[31] == sizes[63] == 28 and sizes[16] == sizes[32] == 16  # each point at full size
    std = schedules.make_plan("standard", 7, 1, 1, 2, 8)
    assert [std.budget_progress(s) for s in (0, 28, 55)] == [0.0, 0.5, 55 / 56]
    x = torch.randn(4, 1, 28, 28)
    # the budget's progress decides, not the run's
    small, _ = MethodList([pr]).transform_batch(x, None, Context(0, 0.0, 0, 1, 0, 0.9, 0.0, 10))
    full, _ = MethodList([pr]).transform_batch(x, None, Context(0, 0.0, 0, 1, 0, 0.0, 0.9, 10))
    assert small.shape == (4, 1, 16, 16) and full is x


SPY = '''
import json
from methods import Method

class Spy(Method):
    """Writes down what the loop hands the methods: each training micro-batch's side and progress, each
    validation batch's side, and after each step the LR of every parameter group."""
    name, order, options = "spy", 99, {"out": ""}

    def transform_batch(self, x, y, ctx):
        self.write(kind="batch", step=ctx.step, side=x.shape[-1], cycle_progress=ctx.cycle_progress)
        return x, y

    def transform_eval_batch(self, x):
        self.write(kind="eval", side=x.shape[-1])
        return x

    def after_step(self, model, optimizer, ctx):
        self.write(kind="step", lrs=[g["lr"] for g in optimizer.param_groups])

    def write(self, **record):
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\\n")
'''


@pytest.mark.parametrize("schedule", ["cyclic", "cyclic-decay", "wsd"])
def test_the_loop_hands_methods_the_budgets_progress_and_drives_every_parameter_group(tmp_path, schedule):
    """Through train.py's own loop: progressive resizing trains at the size of the budget's progress (not the run's)
    and validates at full size; every parameter group (decay and no-decay) follows the schedule's LR at every step,
    through the warmup, cyclic-decay's and wsd's closed forms and back on the trunk after each wsd branch."""
    from types import SimpleNamespace

    import schedules
    import train
    (tmp_path / "spy.py").write_text(SPY)
    out, run = tmp_path / "spy.jsonl", tmp_path / "run"
    run_train(TINY + ["--run-dir", str(run), "--amp", "none", "--schedule", schedule, "--decay-exclusions", "on",
                      "--plugins", str(tmp_path / "spy.py"), "--method", f"spy:out={out}",
                      "--method", "progressive_resizing"] + ["--cycle-decay", "0.5"] * (schedule == "cyclic-decay"))
    cfg = json.loads((run / "config.json").read_text())
    ns = SimpleNamespace(**cfg)
    plan = train.make_plan(ns, ns, cfg["steps_per_epoch"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    pr = build("progressive_resizing")
    batches = [r for r in records if r["kind"] == "batch"]
    assert len(batches) >= plan.run_steps and {16, 24, 32} <= {r["side"] for r in batches}
    for r in batches:
        assert r["cycle_progress"] == plan.budget_progress(r["step"])
        assert r["side"] == pr.size(32, plan.budget_progress(r["step"])), r
    assert {r["side"] for r in records if r["kind"] == "eval"} == {32}
    steps = [r["lrs"] for r in records if r["kind"] == "step"]
    assert len(steps) == plan.run_steps and all(len(lrs) == 2 for lrs in steps)
    for run_step, lrs in enumerate(steps):
        assert lrs == pytest.approx([schedules.lr_at(plan, run_step, 0.1)] * 2, rel=1e-6, abs=1e-12), run_step


def test_the_new_methods_resume_exactly_and_change_the_run(tmp_path):
    """EMA (its average in the checkpoint), SAM, CutMix (its draws), stochastic depth (the RNG) and progressive
    resizing (its sizes from the step) together: a resume from the previous checkpoint ends bit for bit alike; and
    each of the five changes the run: the first curve point moves when any one of them is left out."""
    specs = ["ema:decay=0.9", "sam", "cutmix", "stochastic_depth", "progressive_resizing"]
    flags = lambda ms: [f for m in ms for f in ("--method", m)]  # noqa: E731
    args = TINY + ["--amp", "none", "--eval-every", "1"] + flags(specs)
    ref = str(tmp_path / "ref")
    p = run_train(args + ["--run-dir", ref])
    cfg = json.load(open(os.path.join(ref, "config.json")))
    assert cfg["methods"] == ["cutmix", "ema:decay=0.9", "progressive_resizing", "sam", "stochastic_depth"]
    assert cfg["methods_without_effect"] == [] and "warning" not in p.stdout
    resume_from_previous_checkpoint(ref, str(tmp_path / "run"), args)
    point = [r for r in rows(ref) if r["cycle_end"] == "1"][0]  # the first cycle's end, at epoch 2

    def first_point(ms, name):  # the same run up to its first curve point: one cycle, no other evaluation
        run_train(TINY + ["--amp", "none", "--cycles", "1", "--eval-every", "0", "--run-dir", str(tmp_path / name)]
                  + flags(ms))
        return rows(str(tmp_path / name))[-1]
    same = first_point(specs, "all")
    assert (same["epoch"], same["val_loss"]) == (point["epoch"], point["val_loss"])  # (train_loss: other windows)
    for m in specs:
        without = first_point([s for s in specs if s != m], f"without-{m}")
        assert without["val_loss"] != point["val_loss"], m


def test_a_plug_in_subclass_of_a_built_in_is_another_method_and_loads_once(tmp_path):
    """It inherits the hooks, not the alias flag: --label-smoothing still selects label smoothing alone; a file
    loaded again (a second --plugins, a second train.main in one process) is the same methods, not a clash."""
    from methods import load_plugins, selected
    from options import parse_args
    plugin = tmp_path / "cals.py"
    plugin.write_text("from methods.label_smoothing import LabelSmoothing\n\n"
                      "class CaLS(LabelSmoothing):\n    name = 'ca_ls'\n")
    assert load_plugins([str(plugin), str(plugin)]) == ["ca_ls", "ca_ls"]
    args = parse_args(["--plugins", str(plugin), "--label-smoothing"])
    ms, plugins = selected(args)
    assert ms.specs == ["label_smoothing"] and plugins == {}
    ms, plugins = selected(parse_args(["--plugins", str(plugin), "--method", "ca_ls:eps=0.2"]))
    assert ms.specs == ["ca_ls:eps=0.2"] and list(plugins) == ["ca_ls"]


def test_a_non_finite_second_pass_skips_the_step_without_a_trace():
    """--skip-nonfinite with a method that recomputes the gradient (SAM): a NaN there is caught like a NaN loss."""
    from train import train_step

    class NanRerun(Method):
        name = "nan_rerun"

        def before_step(self, model, optimizer, ctx):
            optimizer.zero_grad(set_to_none=True)
            self.poison = True
            ctx.forward_backward()

        def transform_batch(self, x, y, ctx):
            return (x * float("nan") if getattr(self, "poison", False) else x), y
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), MethodList([NanRerun()]),
                      torch.autocast("cpu", enabled=False), torch.randn(4, 1, 28, 28), torch.arange(4), 1, False,
                      step_context(), check_finite=True)
    assert loss is None and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progressive_resizing_never_trains_above_the_images_size():
    pr = build("progressive_resizing:size_increment=8")
    assert [pr.size(28, p) for p in (0.0, 0.65, 0.9)] == [16, 24, 28]  # 28 is no multiple of 8: itself at scale 1
    assert build("progressive_resizing:size_increment=3").size(32, 0.79) <= 32


def test_config_json_and_a_checkpoint_are_named_alike_whichever_predates_the_api():
    from train import api_names
    old = {"methods": ["label_smoothing", "mixup"], "label_smoothing": 0.2, "mixup": 0.2}
    new = {"methods": ["label_smoothing:eps=0.2", "mixup"], "plugins": {},
           "method_options": {"label_smoothing": {"eps": 0.2}, "mixup": {"alpha": 0.2}}}
    assert api_names(old)["methods"] == new["methods"]
    assert api_names(old)["method_options"] == new["method_options"] == api_names(new)["method_options"]
    # a checkpoint written between the API and method_options records plugins only: it adds no empty options
    assert "method_options" not in api_names({"methods": ["ema"], "plugins": {}})


@pytest.mark.parametrize("word", ["mx", "ls", "bp", "cl"])
def test_a_plug_in_named_like_a_built_ins_short_name_is_refused_in_one_line(tmp_path, word):
    """launch.sh's `--methods mx` is MixUp: a plug-in called mx (or labelled mx) would be one name for two methods,
    run by launch.sh as MixUp and by train.py as itself. It is refused, by train.py and by launch.sh's check."""
    named, short = tmp_path / f"{word}.py", tmp_path / "short.py"
    named.write_text(f"from methods import Method\n\nclass Mine(Method):\n    name = {word!r}\n")
    short.write_text(f"from methods import Method\n\nclass Mine(Method):\n    name, short = 'mine_{word}', {word!r}\n")
    builtin = next(n for n, c in methods.REGISTRY.items() if c.short == word)
    for plugin, method in ((named, word), (short, f"mine_{word}")):
        run = tmp_path / "run"
        p = run_train(TINY + ["--plugins", str(plugin), "--method", method, "--run-dir", str(run)], check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert f"in {plugin}" in p.stderr and f"'{word}', already method {builtin}'s short name" in p.stderr
        assert not run.exists()
    assert build(word).name == builtin  # train.py's --method mx is launch.sh's mx


def test_a_plug_in_named_baseline_is_refused_in_one_line(tmp_path):
    """launch.sh's `--methods baseline` is the set of no method: a plug-in of that name would run there as the
    baseline and in train.py as itself."""
    plugin, run = tmp_path / "baseline.py", tmp_path / "run"
    plugin.write_text("from methods import Method\n\nclass Mine(Method):\n    name = 'baseline'\n")
    p = run_train(TINY + ["--plugins", str(plugin), "--method", "baseline", "--run-dir", str(run)], check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "the word for no method" in p.stderr and not run.exists()


def test_a_plug_in_subclass_does_not_take_the_built_ins_label():
    class Calibrated(methods.REGISTRY["label_smoothing"]):
        name = "calibrated_ls"
    assert Calibrated().label == "calibrated_ls" and build("label_smoothing").label == "ls"


BUFFER_SPY = '''import contextlib, os, torch
from methods import Method

class BufferSpy(Method):
    """Innermost at evaluation: saves the buffers of the weights evaluated (EMA's), per rank and evaluation."""
    name, order = "buffer_spy", 95
    evaluations = 0

    @contextlib.contextmanager
    def eval_weights(self, model):
        self.evaluations += 1
        torch.save([b.clone() for b in model.buffers()],
                   os.path.join({out!r}, f"rank{{os.environ['RANK']}}-{{self.evaluations}}.pt"))
        yield
'''


def test_the_emas_batchnorm_statistics_are_rank_0s_on_every_rank_at_each_evaluation(tmp_path):
    """2 gloo ranks: each rank's batches move its own BatchNorm statistics, and so its EMA's; rank 0's are the
    ones evaluated and saved, and every rank holds them at each evaluation (as after a resume)."""
    spy = tmp_path / "spy.py"
    spy.write_text(BUFFER_SPY.format(out=str(tmp_path)))
    run_train(TINY + ["--amp", "none", "--eval-every", "1", "--method", "ema:decay=0.9", "--plugins", str(spy),
                      "--method", "buffer_spy", "--run-dir", str(tmp_path / "run")], torchrun=2)
    for n in (1, 2, 3, 4):
        a, b = (torch.load(tmp_path / f"rank{r}-{n}.pt") for r in (0, 1))
        assert len(a) > 10 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), n


RANK_SPY = '''import os, torch
from methods import Method

class RankSpy(Method):
    """Records, per rank, what the loop's Context says of the rank and one draw of its key, at each micro-batch."""
    name = "rank_spy"

    def transform_batch(self, x, y, ctx):
        with open(os.path.join({out!r}, f"rank{{os.environ['RANK']}}.txt"), "a") as f:
            f.write(f"{{ctx.step}} {{ctx.micro}} {{ctx.rank}} {{torch.rand(1, generator=ctx.generator()).item()!r}}\\n")
        return x, y
'''


def test_the_loop_gives_each_rank_its_own_context_and_draws(tmp_path):
    """2 gloo ranks through train.py's own loop (not a hand-built Context): each rank's methods are told its rank,
    and at every step the two ranks draw different numbers from their keys (MixUp's lambda, CutMix's box, a
    plug-in's mask would otherwise be the same on every rank)."""
    spy = tmp_path / "spy.py"
    spy.write_text(RANK_SPY.format(out=str(tmp_path)))
    run_train(TINY + ["--amp", "none", "--eval-every", "0", "--plugins", str(spy), "--method", "rank_spy",
                      "--run-dir", str(tmp_path / "run")], torchrun=2)
    seen = [[line.split() for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()] for r in (0, 1)]
    # the first line: the start-up pass (allocator/compile warm-up, undone: it leaves no trace), one image size
    training = [seen[r][1:] for r in (0, 1)]
    assert len(training[0]) == len(training[1]) >= 16
    for r in (0, 1):
        assert {int(rank) for _, _, rank, _ in training[r]} == {r}
    for (step0, micro0, _, draw0), (step1, micro1, _, draw1) in zip(*training):
        assert (step0, micro0) == (step1, micro1) and draw0 != draw1
