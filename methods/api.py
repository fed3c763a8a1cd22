"""The method API: a training method is a `Method` subclass that overrides the hooks it needs.

    class MyAug(Method):
        name = "my_aug"                 # --method my_aug:p=0.5
        options = {"p": 0.5}            # defaults; the types of the defaults parse the command line
        def check(self, run):           # optional: refuse what cannot work (raise MethodError)
            if not 0 <= self.p <= 1:
                raise MethodError(f"{self.name}: p must be in [0, 1], got {self.p}")
        def transform_batch(self, x, y, ctx):
            keep = torch.rand(len(x), generator=ctx.generator(x.device), device=x.device) >= self.p
            return x * keep[:, None, None, None], y

Where the loop (train.py) calls the hooks, in this order:

    build         model_kwargs() -> [model built, on its device] -> apply_model(model) -> check(run)
                  -> [optimizer built] -> wrap_optimizer(optimizer, model)
    each micro-batch   transform_batch(x, y, ctx) -> forward -> loss(logits, targets, ctx, base_loss) -> backward
    cost accounting    train_image_size((H, W), ctx): the size transform_batch gives the model (FLOPs, calibration)
    each step     before_step(model, optimizer, ctx) -> [clip, optimizer step] -> after_step(model, optimizer, ctx)
    evaluation    with eval_weights(model): every validation batch through transform_eval_batch(x)
    checkpoint    state_dict() on save (and at a wsd branch point); load_state_dict(state) on resume
    start-up      one trial transform_batch -> forward -> loss -> backward per process (compilation, FLOPs), undone:
                  weights, RNG and state_dict() are put back, so keep what a method counts in its state_dict()

Composition: methods run in the order of their `order` (then name). apply_model, wrap_optimizer, transform_batch
and transform_eval_batch chain in that order; before_step and after_step run in it; eval_weights nest in it (the
last is innermost); each loss hook gets as base_loss the loss of the methods before it (the first gets plain
cross-entropy). Targets start as class indices; a method may turn them into soft targets (float, [N, classes]),
and the base loss then is the soft-target cross-entropy (timm's). Methods with the same `exclusive` group cannot
run together (MixUp and CutMix: cutmix:mixup_alpha=A switches between them as timm does); two methods asking for
the same model_kwargs key with different values are refused.

The gradient and SAM (order 70): a method whose before_step recomputes the gradient (`recomputes_gradient`) replaces
it. A before_step ordered before SAM (the default 50 is) sees and edits the first gradient, the one SAM perturbs
along, but the update uses SAM's second pass, so those edits (clipping, zeroing, noise) do not reach it (train.py
prints a warning line for each such pair); a before_step ordered after 70 sees the second-pass gradient and edits
the one the update uses. Composer's SAM behaves the same way.

`ctx` (a Context) says where the step is: the path step (optimizer steps this model has taken), epoch, rank, world
size, `run_progress` (fraction of the run) and `cycle_progress` (fraction of the current cycle or budget), and
gives each micro-batch a reproducible random key (`ctx.key`, `ctx.generator()`), so that a resumed run draws the
same. A method whose behaviour depends on the training's length must use one of the two progresses and say which.
"""
import contextlib
import zlib
from dataclasses import dataclass, field, replace

import torch
from timm.loss import SoftTargetCrossEntropy


class MethodError(ValueError):
    """A method's options or its fit to the run are wrong; the message names the method and the fix."""


class Method:
    """Base class of every training method: the hooks below do nothing; override those the method needs."""
    name = None  # the registry's name: --method NAME[:key=value,...]
    short = None  # run-directory label (default: name); never inherited (own_short): a subclass is another method
    options = {}  # option -> default; the default's type (bool, int, float, str) parses a value
    order = 50  # hooks fire in ascending order (then by name): soft targets 10, mixing 20, resizing 30, SAM 70,
    # EMA 80, layout 90
    exclusive = None  # methods sharing a group cannot be combined
    no_effect = None  # apply_model sets a reason when the method changed nothing in this model
    recomputes_gradient = False  # its before_step replaces the step's gradient (ctx.forward_backward(): SAM)

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise MethodError(f"--method {self.name}: unknown option '{unknown[0]}'; {self.name} takes "
                              f"{', '.join(self.options) or 'no options'}")
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))

    def check(self, run):
        """Raise MethodError where the method cannot work with this run (its options, model, batch, schedule).
        `run` has: model (built and prepared), schedule, micro_batch, world_size, num_classes, image_shape."""

    def model_kwargs(self):
        """Extra keyword arguments for the model's creation (timm.create_model)."""
        return {}

    def apply_model(self, model):
        """Model surgery before the optimizer and DDP are built; `model` is on its device. Returns the model."""
        return model

    def wrap_optimizer(self, optimizer, model):
        """The optimizer to train with (e.g. a wrapper around `optimizer`); the LR schedule drives its groups."""
        return optimizer

    def transform_batch(self, x, y, ctx):
        """One training micro-batch on the device, its own to change in place; returns (x, y), y maybe soft."""
        return x, y

    def transform_eval_batch(self, x):
        """One validation batch (and the batches of BatchNorm recalibration); returns x."""
        return x

    def train_image_size(self, size, ctx):
        """The (H, W) of this step's training images after transform_batch, given their (H, W) before it. A method
        that changes the size (progressive resizing) overrides it: train.py counts each step's FLOPs, and
        benchmarks.calibrate times each size, from it, without running transform_batch."""
        return size

    def loss(self, logits, targets, ctx, base_loss):
        """The training loss of one micro-batch; base_loss(logits, targets) is the loss without this method."""
        return base_loss(logits, targets)

    def before_step(self, model, optimizer, ctx):
        """After the step's gradients are complete (all micro-batches, all-reduced under DDP; scaled by
        ctx.grad_scale under fp16), before clipping and the update. ctx.forward_backward() recomputes them (set
        recomputes_gradient then): the gradient the hooks ordered after this one see, and the update uses."""

    def after_step(self, model, optimizer, ctx):
        """After the optimizer's update (not called for a skipped non-finite step)."""

    @contextlib.contextmanager
    def eval_weights(self, model):
        """Context in which the model is evaluated (e.g. swap in averaged weights); must restore them exactly."""
        yield

    def state_dict(self):
        """What resume needs to continue exactly (None: nothing)."""
        return None

    def load_state_dict(self, state):
        """Put back what state_dict() returned."""

    def config(self):
        """Extra config.json entries this method records (e.g. which layers it changed)."""
        return {}

    # ---- naming ----

    def non_default(self):
        """{option: value} of the options that differ from the defaults."""
        return {k: getattr(self, k) for k, d in self.options.items() if getattr(self, k) != d}

    @property
    def spec(self):
        """Canonical name: the name, then the non-default options sorted, e.g. 'sam:rho=0.1'."""
        extra = self.non_default()
        return self.name + (":" + ",".join(f"{k}={format_value(v)}" for k, v in sorted(extra.items())) if extra
                            else "")

    @property
    def label(self):
        """The run-directory label: the short name, with non-default options."""
        extra = self.non_default()
        return (own_short(type(self)) or self.name) + "".join(f"-{k}{format_value(v)}"
                                                             for k, v in sorted(extra.items()))


def format_value(value):
    """An option's value as the canonical spec writes it (true/false, repr of a float, the word itself)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Context:
    """Where the loop is, for one micro-batch (transform_batch, loss) or one step (before_step, after_step)."""
    step: int  # path step: the optimizer steps this model has taken before this one
    epoch: float  # step / steps per epoch
    rank: int
    world_size: int
    seed: int  # --seed
    run_progress: float  # step / the run's total path steps
    cycle_progress: float  # fraction of the current cycle (warmup included in the first) or budget
    num_classes: int
    micro: int = 0  # micro-batch within the step (--grad-accum)
    grad_scale: torch.Tensor = None  # before_step: fp16's loss scale the gradients carry (1 otherwise)
    forward_backward: object = field(default=None, repr=False)  # before_step: recompute this step's gradients

    @property
    def key(self):
        """(path step, rank, micro-batch): the same for the same micro-batch of a resumed or repeated run."""
        return self.step, self.rank, self.micro

    def generator(self, device="cpu", salt=""):
        """A torch.Generator seeded from (--seed, key, salt): reproducible, independent of history."""
        g = torch.Generator(device=device)
        g.manual_seed(hash((self.seed, *self.key, zlib.crc32(salt.encode()))) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def for_micro(self, micro):
        return replace(self, micro=micro)


@contextlib.contextmanager
def weights_kept(model):
    """Whatever runs inside leaves `model`'s parameters and buffers bit for bit as they were: a copy, kept on the
    CPU (off the GPU's memory), put back at the end."""
    saved = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


def own_short(cls):
    """The class's own short name, or None: a subclass of a built-in does not take the built-in's label."""
    return vars(cls).get("short")


def overrides(method, hook):
    return getattr(type(method), hook) is not getattr(Method, hook)


class MethodList:
    """The run's methods in hook order, and the loop's calls into them (each fires only the methods that
    override the hook)."""

    def __init__(self, methods):
        self.all = sorted(methods, key=lambda m: (m.order, m.name))
        groups = {}
        for m in self.all:
            if m.exclusive and m.exclusive in groups:
                raise MethodError(f"--method {groups[m.exclusive].name} and {m.name} cannot be combined (both "
                                  f"{m.exclusive}); choose one" + (": cutmix:mixup_alpha=A switches between them as "
                                                                  "timm does" if m.exclusive == "mixing" else ""))
            groups.setdefault(m.exclusive, m)
        self._hooked = {hook: [m for m in self.all if overrides(m, hook)] for hook in (
            "transform_batch", "transform_eval_batch", "loss", "before_step", "after_step", "eval_weights",
            "train_image_size")}
        self.reruns = bool(self._hooked["before_step"])  # a second pass over the step's batch (SAM)

    @property
    def specs(self):
        """Canonical specs, sorted: config.json's `methods` ([] is the baseline)."""
        return sorted(m.spec for m in self.all)

    def model_kwargs(self):
        merged = {}
        for m in self.all:
            for k, v in m.model_kwargs().items():
                if k in merged and merged[k] != v:
                    raise MethodError(f"--method {m.name}: model option {k}={v!r} conflicts with another method's "
                                      f"{k}={merged[k]!r}")
                merged[k] = v
        return merged

    def apply_model(self, model):
        for m in self.all:
            model = m.apply_model(model)
        return model

    def check(self, run):
        for m in self.all:
            m.check(run)

    def wrap_optimizer(self, optimizer, model):
        for m in self.all:
            optimizer = m.wrap_optimizer(optimizer, model)
        return optimizer

    def transform_batch(self, x, y, ctx):
        if self.reruns and self._hooked["transform_batch"]:  # the raw batch is needed again: the methods get a copy
            x, y = x.clone(), y.clone()
        for m in self._hooked["transform_batch"]:
            x, y = m.transform_batch(x, y, ctx)
        return x, y

    @property
    def resizes(self):
        """Some method changes the training images' size during the run (progressive resizing)."""
        return bool(self._hooked["train_image_size"])

    @property
    def passes(self):
        """Forward and backward passes over the step's batch: 1, plus one per method that recomputes the gradient
        (SAM): the FLOPs of a step."""
        return 1 + sum(m.recomputes_gradient for m in self._hooked["before_step"])

    def train_image_size(self, size, ctx):
        for m in self._hooked["train_image_size"]:
            size = tuple(m.train_image_size(size, ctx))
        return tuple(size)

    def transform_eval_batch(self, x):
        for m in self._hooked["transform_eval_batch"]:
            x = m.transform_eval_batch(x)
        return x

    def loss(self, logits, targets, ctx):
        def compose(fn, method):
            return lambda lg, t: method.loss(lg, t, ctx, fn)
        fn = base_loss
        for m in self._hooked["loss"]:
            fn = compose(fn, m)
        return fn(logits, targets)

    def before_step(self, model, optimizer, ctx):
        for m in self._hooked["before_step"]:
            m.before_step(model, optimizer, ctx)

    def after_step(self, model, optimizer, ctx):
        for m in self._hooked["after_step"]:
            m.after_step(model, optimizer, ctx)

    @contextlib.contextmanager
    def eval_weights(self, model):
        with contextlib.ExitStack() as stack:
            for m in self._hooked["eval_weights"]:
                stack.enter_context(m.eval_weights(model))
            yield

    def state_dict(self):
        return {m.name: s for m in self.all if (s := m.state_dict()) is not None}

    def load_state_dict(self, states):
        """Methods with state must find it (a checkpoint of other methods is refused before this)."""
        for m in self.all:
            if m.state_dict() is not None:
                if m.name not in (states or {}):
                    raise MethodError(f"--resume: the checkpoint holds no state of method {m.name}")
                m.load_state_dict(states[m.name])

    def config(self):
        out = {}
        for m in self.all:
            out.update(m.config())
        return out

    def without_effect(self):
        return sorted(m.spec for m in self.all if m.no_effect)

    def warnings(self):
        """One line for each before_step hook ordered before a method that recomputes the gradient: its edits to
        the gradient do not reach the update."""
        hooked = self._hooked["before_step"]
        return [f"method {m.spec}'s before_step (order {m.order}) runs before {r.spec}'s (order {r.order}), which "
                f"recomputes the gradient: what {m.name} does to the gradient does not reach the update (give it an "
                f"order above {r.order} to change the gradient the update uses)"
                for i, r in enumerate(hooked) if r.recomputes_gradient for m in hooked[:i]]


def base_loss(logits, targets):
    """Cross-entropy in fp32 against class indices, or soft targets (timm's SoftTargetCrossEntropy)."""
    if targets.dtype.is_floating_point:
        return SOFT_TARGET_LOSS(logits.float(), targets)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


SOFT_TARGET_LOSS = SoftTargetCrossEntropy()
