"""Label smoothing and MixUp as one training objective: soft targets and their cross-entropy.

Label smoothing puts 1 - eps + eps/C on the true class and eps/C elsewhere; MixUp (Zhang 2017)
mixes each batch with its reverse by lambda ~ Beta(alpha, alpha) and mixes the (smoothed) targets
alike. Both come from timm (Mixup, mixup_target, SoftTargetCrossEntropy), so they compose as timm
composes them."""
import numpy as np
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy


class SoftTargetObjective:
    """Turns (images, labels) into (images, soft targets) and scores logits against them."""

    def __init__(self, num_classes, label_smoothing=0.0, mixup_alpha=0.0, seed=0):
        self.num_classes, self.label_smoothing, self.seed = num_classes, label_smoothing, seed
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=0.0, prob=1.0, mode="batch",
                           label_smoothing=label_smoothing, num_classes=num_classes) if mixup_alpha > 0 else None
        self.loss_fn = SoftTargetCrossEntropy()

    def __call__(self, x, y, draw_key):
        """`draw_key` (step, rank, micro-step) fixes MixUp's lambda, so a resumed run draws the same."""
        if self.mixup is None:
            return x, mixup_target(y, self.num_classes, 1.0, self.label_smoothing)
        # timm's Mixup draws from NumPy's global generator: seed it from the key, never from history.
        np.random.seed(hash((self.seed, *draw_key)) & 0xFFFF_FFFF)
        return self.mixup(x, y)

    def loss(self, logits, targets):
        return self.loss_fn(logits.float(), targets)
