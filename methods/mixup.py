"""MixUp (Zhang et al. 2018): each micro-batch mixed with its reverse by lambda ~ Beta(alpha, alpha), the targets
alike; timm's Mixup draws lambda and mixes the images. The draw is seeded from the micro-batch's key (not from
history), so a resumed run draws the same. Targets arriving soft (label smoothing ran first) are mixed with the
same lambda, which is what timm's Mixup(label_smoothing=eps) computes, to the bit."""
import numpy as np
from timm.data import Mixup
from timm.data.mixup import mixup_target

from methods.api import Method, MethodError


class MixUp(Method):
    """--method mixup[:alpha=0.2] (alias --mixup [ALPHA])."""
    name, short, order, exclusive, options = "mixup", "mx", 20, "mixing", {"alpha": 0.2}

    def __init__(self, **options):
        super().__init__(**options)
        self.check_options()
        self.mixer = self.make_mixer()

    def check_options(self):
        if not self.alpha > 0:
            raise MethodError(f"--method {self.name}: alpha must be > 0, got {self.alpha}")

    def make_mixer(self):
        return Mixup(mixup_alpha=self.alpha, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.0)

    def check(self, run):
        if run.micro_batch % 2:
            raise MethodError(f"--method {self.name} needs an even micro-batch (batch / (world size x grad-accum)), "
                              f"got {run.micro_batch}")

    def transform_batch(self, x, y, ctx):
        # timm's Mixup draws from NumPy's global generator: seeded from the key (never from history), then put back,
        # so that whatever else draws from it (a plug-in) goes on with its own stream
        state = np.random.get_state()
        np.random.seed(hash((ctx.seed, *ctx.key)) & 0xFFFF_FFFF)
        try:
            lam = self.mixer._mix_batch(x)  # mixes x in place (the loop hands the methods a batch of their own)
        finally:
            np.random.set_state(state)
        if y.dtype.is_floating_point:
            return x, y * lam + y.flip(0) * (1. - lam)
        return x, mixup_target(y, ctx.num_classes, lam, 0.0)

    def config(self):
        return {"mixup": self.alpha}

    @staticmethod
    def add_alias_flags(group):
        group.add_argument("--mixup", type=float, nargs="?", const=0.2, default=0.0, metavar="ALPHA",
                           help="= --method mixup:alpha=ALPHA (0: off)")

    @staticmethod
    def from_alias_flags(args):
        if args.mixup < 0:
            raise MethodError(f"--mixup must be >= 0, got {args.mixup}")
        return {"alpha": args.mixup} if args.mixup > 0 else None
