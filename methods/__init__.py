"""Training methods: the plug-in API (methods/api.py), the registry (methods/registry.py), and the built-ins, one
file each. Methods change the model, the batch, the loss, the update or the weights evaluated; never the schedule
or the data order. README 'Methods' lists the built-ins with their options and hooks.

methods/naming.py (how runs record their methods) is pure Python, and the analysis reads runs with it alone: so the
names below, which import torch and timm, load on first use (PEP 562), the built-ins registering then."""
__all__ = ["ALIAS_KEYS", "BUILT_IN", "Context", "Method", "MethodError", "MethodList", "REGISTRY", "add_flags", "build",
           "load_plugins", "register", "selected", "weights_kept", "BlurPool", "ChannelsLast", "CutMix", "EMA",
           "LabelSmoothing", "MixUp", "ProgressiveResizing", "SAM", "StochasticDepth"]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'methods' has no attribute {name!r}")
    from methods import api, registry
    from methods.blurpool import BlurPool
    from methods.channels_last import ChannelsLast
    from methods.cutmix import CutMix
    from methods.ema import EMA
    from methods.label_smoothing import LabelSmoothing
    from methods.mixup import MixUp
    from methods.progressive_resizing import ProgressiveResizing
    from methods.sam import SAM
    from methods.stochastic_depth import StochasticDepth
    built_in = (BlurPool, ChannelsLast, LabelSmoothing, MixUp, CutMix, EMA, StochasticDepth, SAM, ProgressiveResizing)
    for cls in built_in:
        registry.register(cls)
    globals().update({c.__name__: c for c in built_in}, BUILT_IN=built_in,
                     **{n: getattr(api, n) for n in ("Context", "Method", "MethodError", "MethodList", "weights_kept")},
                     **{n: getattr(registry, n) for n in ("ALIAS_KEYS", "REGISTRY", "add_flags", "build",
                                                          "load_plugins", "register", "selected")})
    return globals()[name]
