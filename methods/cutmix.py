"""CutMix (Yun et al. 2019): a random box of each image replaced by the same box of the reversed batch, the
targets mixed by the box's area; with mixup_alpha > 0 each micro-batch is CutMix with probability switch_prob and
MixUp otherwise, as timm's Mixup(mixup_alpha, cutmix_alpha, switch_prob) does (timm's recipe: mixup_alpha=0.8,
alpha=1.0, switch_prob=0.5). Drawn like MixUp, from the micro-batch's key."""
from timm.data import Mixup

from methods.api import MethodError
from methods.mixup import MixUp


class CutMix(MixUp):
    """--method cutmix[:alpha=1.0,mixup_alpha=0.0,switch_prob=0.5]."""
    name, short, options = "cutmix", "cm", {"alpha": 1.0, "mixup_alpha": 0.0, "switch_prob": 0.5}

    def check_options(self):
        super().check_options()
        if self.mixup_alpha < 0 or not 0 <= self.switch_prob <= 1:
            raise MethodError(f"--method cutmix: mixup_alpha must be >= 0 and switch_prob in [0, 1], got "
                              f"{self.mixup_alpha} and {self.switch_prob}")

    def make_mixer(self):
        return Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.alpha, switch_prob=self.switch_prob, prob=1.0,
                     mode="batch", label_smoothing=0.0)

    def config(self):
        return {}
