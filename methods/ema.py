"""EMA: an exponential moving average of the weights (and BatchNorm statistics), evaluated instead of the trained
weights: timm's ModelEmaV3, updated after every optimizer step.

decay is the longest averaging horizon (1 / (1 - decay) steps); with warmup (the default) the decay at path step t
is min(decay, 1 - (1 + t)^-warmup_power), so that a short run averages over a horizon that grows with it (0.9 at
~20 steps, 0.99 at ~460, 0.999 at ~10k for power 3/4) instead of carrying its random initialisation.
At a cyclic run's cycle ends: the average is never reset at a restart, so a cycle-end point evaluates an average
over the last ~1 / (1 - decay) steps, which reach back across the previous restart when that horizon is longer
than the cycle: the cyclic curve then mixes weights of a high and a low LR, where a standard run of that budget
averages only its own decayed end. Keep the horizon well under the first cycle (the EMA's
`ema_horizon_steps` in config.json says what it was) or read its gap as part of the method's effect.
Under DDP the weights are alike on every rank, the BatchNorm statistics are not (each rank's batches move its
own); rank 0's are evaluated and saved, and every rank takes them at each evaluation, as a resume would."""
import contextlib

import torch.distributed as dist
from timm.utils import ModelEmaV3

from methods.api import Method, MethodError, weights_kept


class EMA(Method):
    """--method ema[:decay=0.999,warmup=true,warmup_power=0.75]."""
    name, order, options = "ema", 80, {"decay": 0.999, "warmup": True, "warmup_power": 0.75}

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < self.decay < 1 or not self.warmup_power > 0:
            raise MethodError(f"--method ema: decay must be in (0, 1) and warmup_power > 0, got {self.decay} and "
                              f"{self.warmup_power}")
        self.ema = None

    def check(self, run):
        if run.schedule == "schedule-free":
            raise MethodError("--method ema: schedule-free already evaluates averaged weights; use another schedule")

    def apply_model(self, model):
        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=self.warmup, warmup_power=self.warmup_power)
        return model

    def after_step(self, model, optimizer, ctx):
        self.ema.update(model, step=ctx.step + 1)  # timm counts updates from 1; the first copies the weights

    @contextlib.contextmanager
    def eval_weights(self, model):
        if dist.is_initialized():  # (every rank evaluates at once) rank 0's averaged statistics on every rank
            for buf in self.ema.module.buffers():
                dist.broadcast(buf, 0)
        with weights_kept(model):
            model.load_state_dict(self.ema.module.state_dict())
            yield

    def state_dict(self):
        return self.ema.module.state_dict()

    def load_state_dict(self, state):
        self.ema.module.load_state_dict(state)

    def config(self):
        return {"ema_horizon_steps": round(1 / (1 - self.decay))}
