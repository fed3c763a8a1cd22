"""A run's training FLOPs, counted once at start-up (off the clock) on its own model: torch's flop counter over one
forward and backward pass per image size it trains at; costs.py counts the steps at each size. Also the trial pass
that counting and the start-up (train.Run.warm_up) run: a training pass that leaves no trace."""
import contextlib
import copy
from dataclasses import dataclass

import torch

import costs
from methods import weights_kept
from rng import restore_rng, rng_state


@dataclass
class Flops:
    """A run's training FLOPs: per image at each size it trains at ({'28x28': FLOPs}), and its steps per size."""
    per_image: dict
    counts: costs.StepCounts

    def of(self, counts, batch_size):
        """FLOPs of the steps counted ({size: steps}), batch_size images each."""
        return costs.priced(counts, self.per_image) * batch_size


def count_flops(model, methods, autocast, data, plan, micro, spe):
    """The run's Flops, off the clock: flops_per_image at each image size it trains at (the methods'
    train_image_size over the plan), and its steps per size."""
    sides = costs.step_sides(plan, methods, (data.image_size, data.image_size), spe)
    per_image = flops_per_image(model, methods, autocast, data, micro, side_contexts(plan, sides, spe, data))
    return Flops(per_image, costs.StepCounts(plan, sides, next(iter(per_image))))


def run_side_contexts(plan, methods, data, spe):
    """side_contexts of every image size the run trains at (the methods' train_image_size over the plan)."""
    return side_contexts(plan, costs.step_sides(plan, methods, (data.image_size, data.image_size), spe), spe, data)


def side_contexts(plan, sides, spe, data):
    """{size name: the Context of the first path step that trains at that size} (sides: costs.step_sides)."""
    first = {costs.side_name((data.image_size, data.image_size)): 0} if sides is None else {}
    for p, side in enumerate(sides or []):
        first.setdefault(side, p)
    return {side: costs.step_context(plan, p, spe, num_classes=data.num_classes) for side, p in first.items()}


def flops_per_image(model, methods, autocast, data, micro, contexts):
    """{size name: FLOPs of one training image}: torch's flop counter over one forward and backward pass of a blank
    micro-batch of the data's shape through the methods' transform_batch (which resizes it at that Context) and
    loss, undone (trial_pass), per image, times the passes a step makes (SAM: 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    out = {}
    for side, ctx in sorted(contexts.items()):
        x = torch.zeros(micro, data.in_chans, data.image_size, data.image_size, device=data.device)
        y = torch.zeros(micro, dtype=torch.long, device=data.device)
        with FlopCounterMode(display=False) as counter:
            trial_pass(model, model, methods, autocast, x, y, ctx)
        out[side] = counter.get_total_flops() * methods.passes / micro
    return out


def trial_pass(model, raw_model, methods, autocast, x, y, ctx, scaler=None, ddp=False, grad_accum=1):
    """One training forward and backward pass of `model` (raw_model: under its DDP and compile wrappers) on the
    first of the `grad_accum` micro-batches of (x, y) through the methods' transform_batch and loss, undone:
    weights, BatchNorm statistics, gradients, RNG and the methods' own state (state_dict: a plug-in counting its
    calls counts this one not) as before. The micro-batch is a chunk of a copy of the batch, as train_step's are
    chunks of it: a compiled model given a whole tensor here would fail a guard of the graph compiled on a view
    (dynamic shapes) and compile that size again."""
    rng, kept = rng_state(), copy.deepcopy(methods.state_dict())
    with weights_kept(raw_model):
        model.train()
        # a copy: a batch transform may change it in place
        xm, ym = methods.transform_batch(x.clone().chunk(grad_accum)[0], y.clone().chunk(grad_accum)[0], ctx)
        with (model.no_sync() if ddp else contextlib.nullcontext()), autocast:
            loss = methods.loss(model(xm), ym, ctx)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        raw_model.zero_grad(set_to_none=True)
    methods.load_state_dict(kept)
    restore_rng(rng)
