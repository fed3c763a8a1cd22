"""Training methods: the plug-in API (methods/api.py), the registry (methods/registry.py), and the built-ins, one
file each. Methods change the model, the batch, the loss, the update or the weights evaluated; never the schedule
or the data order. docs/methods.md lists the built-ins with their options and hooks."""
from methods.api import Context, Method, MethodError, MethodList, weights_kept
from methods.blurpool import BlurPool
from methods.channels_last import ChannelsLast
from methods.cutmix import CutMix
from methods.ema import EMA
from methods.label_smoothing import LabelSmoothing
from methods.mixup import MixUp
from methods.progressive_resizing import ProgressiveResizing
from methods.registry import ALIAS_KEYS, REGISTRY, add_flags, build, load_plugins, register, selected
from methods.sam import SAM
from methods.stochastic_depth import StochasticDepth

BUILT_IN = (BlurPool, ChannelsLast, LabelSmoothing, MixUp, CutMix, EMA, StochasticDepth, SAM, ProgressiveResizing)
for _cls in BUILT_IN:
    register(_cls)

__all__ = ["ALIAS_KEYS", "BUILT_IN", "Context", "Method", "MethodError", "MethodList", "REGISTRY", "add_flags", "build",
           "load_plugins", "register", "selected", "weights_kept"]
