"""Training methods as flags: --blurpool, --channels-last, --label-smoothing EPS, --mixup ALPHA.

Each lives in its own module; this file maps flags to them. Methods change the model and the
training objective, never the schedule or the data order. Validation always uses plain
cross-entropy on the (possibly blurpooled) model."""
import torch.nn.functional as F

from methods.blurpool import apply_blurpool
from methods.channels_last import to_channels_last
from methods.soft_targets import SoftTargetObjective

METHOD_NAMES = ("blurpool", "channels_last", "label_smoothing", "mixup")
# Short names for sweeps and run-directory names.
SHORT = {"blurpool": "bp", "channels_last": "cl", "label_smoothing": "ls", "mixup": "mx"}


def selected_methods(cfg):
    """Sorted canonical names of the methods `cfg` turns on ([] is the baseline)."""
    on = {"blurpool": cfg.blurpool, "channels_last": cfg.channels_last,
          "label_smoothing": cfg.label_smoothing > 0, "mixup": cfg.mixup > 0}
    return sorted(name for name, enabled in on.items() if enabled)


def prepare_model(model, cfg):
    if cfg.blurpool:
        apply_blurpool(model)
    if cfg.channels_last:
        model = to_channels_last(model)
    return model


class Objective:
    """The training loss with the configured methods, and the batch preparation they need."""

    def __init__(self, cfg, num_classes):
        self.channels_last = cfg.channels_last
        self.soft = None
        if cfg.label_smoothing > 0 or cfg.mixup > 0:
            self.soft = SoftTargetObjective(num_classes, cfg.label_smoothing, cfg.mixup, cfg.seed)

    def prepare(self, x, y, draw_key):
        if self.soft is not None:
            x, y = self.soft(x, y, draw_key)
        if self.channels_last:
            x = to_channels_last(x)
        return x, y

    def loss(self, logits, targets):
        if self.soft is not None:
            return self.soft.loss(logits, targets)
        return F.cross_entropy(logits.float(), targets)
