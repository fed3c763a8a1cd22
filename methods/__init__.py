"""Training methods as flags: --blurpool [--blurpool-mode MODE], --channels-last, --label-smoothing EPS, --mixup ALPHA.

Each lives in its own module; this file maps flags to them. Methods change the model and the
training objective, never the schedule or the data order. Validation always uses plain
cross-entropy on the (possibly blurpooled) model."""
import torch.nn.functional as F

from methods.blurpool import apply_blurpool, blurred_layers
from methods.channels_last import to_channels_last
from methods.soft_targets import SoftTargetObjective

METHOD_NAMES = ("blurpool", "channels_last", "label_smoothing", "mixup")
# Short names for sweeps and run-directory names.
SHORT = {"blurpool": "bp", "channels_last": "cl", "label_smoothing": "ls", "mixup": "mx"}
# --blurpool-mode: blur each strided conv's input at stride 1 (Composer's default, the paper's), or run the conv
# at stride 1 and let the blur subsample its output (closer to Zhang 2019; x1.5-2 the forward FLOPs).
BLURPOOL_MODES = {"blur-first": True, "conv-first": False}


def selected_methods(cfg):
    """Sorted canonical names of the methods `cfg` turns on ([] is the baseline)."""
    on = {"blurpool": cfg.blurpool, "channels_last": cfg.channels_last,
          "label_smoothing": cfg.label_smoothing > 0, "mixup": cfg.mixup > 0}
    return sorted(name for name, enabled in on.items() if enabled)


def prepare_model(model, cfg):
    """`model` with BlurPool (in cfg.blurpool_mode) and the channels-last layout as `cfg` asks;
    `blurred_layers(model)` names the layers BlurPool replaced."""
    if cfg.blurpool:
        apply_blurpool(model, blur_first=BLURPOOL_MODES[cfg.blurpool_mode])
    if cfg.channels_last:
        model = to_channels_last(model)
    return model


class Objective:
    """The training loss with the configured methods, and the batch preparation they need."""

    def __init__(self, cfg, num_classes):
        self.channels_last, self.label_smoothing, self.mixup_alpha = cfg.channels_last, cfg.label_smoothing, cfg.mixup
        self.soft = None
        if cfg.label_smoothing > 0 or cfg.mixup > 0:
            self.soft = SoftTargetObjective(num_classes, cfg.label_smoothing, cfg.mixup, cfg.seed)

    def prepare(self, x, y, draw_key):
        """The micro-batch and targets to train on; MixUp mixes `x` in place (timm's Mixup does)."""
        if self.soft is not None:
            x, y = self.soft(x, y, draw_key)
        if self.channels_last:
            x = to_channels_last(x)
        return x, y

    def loss(self, logits, targets):
        """Cross-entropy in fp32, against soft targets when label smoothing or MixUp is on."""
        if self.soft is not None:
            return self.soft.loss(logits, targets)
        return F.cross_entropy(logits.float(), targets)
