"""Label smoothing (Szegedy et al. 2016): the targets put 1 - eps + eps/C on the true class and eps/C elsewhere.

It turns class indices into soft targets before any mixing method runs (order 10), with timm's own target code,
so that label smoothing + MixUp (or CutMix) mixes smoothed targets exactly as timm's Mixup(label_smoothing=eps)
does."""
from timm.data.mixup import mixup_target

from methods.api import Method, MethodError


class LabelSmoothing(Method):
    """--method label_smoothing[:eps=0.1] (alias --label-smoothing [EPS])."""
    name, short, order, options = "label_smoothing", "ls", 10, {"eps": 0.1}

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < self.eps < 1:
            raise MethodError(f"--method label_smoothing: eps must be in (0, 1), got {self.eps}")

    def transform_batch(self, x, y, ctx):
        if y.dtype.is_floating_point:  # a method before it made soft targets: smooth them alike
            return x, y * (1 - self.eps) + self.eps / y.shape[1]
        return x, mixup_target(y, ctx.num_classes, 1.0, self.eps)

    def config(self):
        return {"label_smoothing": self.eps}

    @staticmethod
    def add_alias_flags(group):
        group.add_argument("--label-smoothing", type=float, nargs="?", const=0.1, default=0.0, metavar="EPS",
                           help="= --method label_smoothing:eps=EPS (0: off)")

    @staticmethod
    def from_alias_flags(args):
        if args.label_smoothing < 0 or args.label_smoothing >= 1:
            raise MethodError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
        return {"eps": args.label_smoothing} if args.label_smoothing > 0 else None
