"""BlurPool (Zhang 2019) as the paper ran it: Composer's `apply_blurpool` with its defaults (`blur_first=True`).

What `apply_blurpool(model)` does:
- every Conv2d with a stride > 1 that reads >= `min_channels` (16) channels, the 1x1 downsample convs included,
  becomes a stride-1 blur of its input followed by the unchanged conv (same stride, same weights). The stem reads
  the image (1 or 3 channels) and is left alone. Cost: the conv's own plus a cheap depthwise 3x3 blur
  (forward FLOPs x1.04 on the small ResNet, x1.005 on ResNet-50, counted by torch's FlopCounterMode).
- every MaxPool2d with a stride > 1 becomes the same max-pool at stride 1 followed by the blur at the pool's stride.
With `blur_first=False` (Composer's other option, closer to Zhang's paper, which also has the ReLU in between) each
such conv instead runs at stride 1 and the blur subsamples its output: about 4x the conv's FLOPs (forward FLOPs
x1.95 on the small ResNet, x1.48 on ResNet-50). Max-pools are treated alike in both modes, as in Composer.

The blur is timm's BlurPool2d with filt_size=3 (the binomial [1 2 1] x [1 2 1] / 16, Composer's filter) and
pad_mode="constant": zero padding, so it computes exactly Composer's `blur_2d` (timm's default pads by reflection).
Differences from Composer: stride-1 max-pools are left alone (Composer blurs them at stride 1; ResNets have none),
and a blur stride is one number, the largest of the layer's strides (ResNets have no asymmetric strides).
Each replaced layer becomes a `BlurredLayer`, an nn.Sequential of the two steps, so the conv's weights are stored
under `<name>.1.` (blur first) or `<name>.0.` (conv first) instead of `<name>.`."""
import torch.nn as nn
from timm.layers import BlurPool2d

from methods.api import Method, MethodError

# mode: blur each strided conv's input at stride 1 (Composer's default, the paper's), or run the conv at stride 1
# and let the blur subsample its output (closer to Zhang 2019; x1.5-2 the forward FLOPs)
MODES = {"blur-first": True, "conv-first": False}


class BlurPool(Method):
    """--method blurpool[:mode=blur-first|conv-first] (alias --blurpool [--blurpool-mode MODE])."""
    name, short, options = "blurpool", "bp", {"mode": "blur-first"}

    def __init__(self, **options):
        super().__init__(**options)
        if self.mode not in MODES:
            raise MethodError(f"--method blurpool: unknown mode '{self.mode}'; choose {' or '.join(MODES)}")
        self.replaced = []

    def apply_model(self, model):
        device = next(model.parameters()).device
        self.replaced = apply_blurpool(model, blur_first=MODES[self.mode])
        if not self.replaced:
            self.no_effect = "no strided convolution or max-pool to blur"
        return model.to(device)  # the blurs' filters join the model's device

    def config(self):
        return {"blurpool_layers": self.replaced, "blurpool_mode": self.mode}

    @staticmethod
    def add_alias_flags(group):
        group.add_argument("--blurpool", action="store_true", help="= --method blurpool (anti-aliased downsampling)")
        group.add_argument("--blurpool-mode", default="blur-first",
                           help="with --blurpool: blur-first: a stride-1 blur, then the strided layer (the paper's, "
                                "Composer's default); conv-first: the layer at stride 1, then a strided blur (x1.95 "
                                "forward FLOPs on the small ResNet, x1.48 on ResNet-50)")

    @staticmethod
    def from_alias_flags(args):
        if args.blurpool_mode not in MODES:
            raise MethodError(f"--blurpool-mode: unknown '{args.blurpool_mode}'; choose {' or '.join(MODES)}")
        if args.blurpool_mode != "blur-first" and not args.blurpool:
            raise MethodError("--blurpool-mode goes with --blurpool; or write --method blurpool:mode=conv-first")
        return {"mode": args.blurpool_mode} if args.blurpool else None


class BlurredLayer(nn.Sequential):
    """A strided layer with its anti-aliasing blur: (blur, conv), (conv, blur) or (max-pool, blur)."""


def blur(channels, stride):
    """Composer's 3x3 binomial blur with zero padding; `channels=None` takes them from the input."""
    return BlurPool2d(channels, filt_size=3, stride=stride, pad_mode="constant")


def _stride(m):
    return m.stride if isinstance(m.stride, int) else max(m.stride)


def _blurred(module, blur_first, min_channels):
    """The BlurredLayer that replaces `module`, or None if it stays."""
    if isinstance(module, nn.Conv2d) and _stride(module) > 1 and module.in_channels >= min_channels:
        if blur_first:
            return BlurredLayer(blur(module.in_channels, 1), module)
        stride, module.stride = _stride(module), (1, 1)
        return BlurredLayer(module, blur(module.out_channels, stride))
    if isinstance(module, nn.MaxPool2d) and _stride(module) > 1:
        dense = nn.MaxPool2d(module.kernel_size, stride=1, padding=module.padding, dilation=module.dilation,
                             ceil_mode=module.ceil_mode)
        return BlurredLayer(dense, blur(None, _stride(module)))
    return None


def apply_blurpool(model, blur_first=True, min_channels=16):
    """Rewrite `model` in place as the module docstring says; returns the names of the layers replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        new = _blurred(module, blur_first, min_channels)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
            replaced.append(name)
    return replaced


def blurred_layers(model):
    """Names of the layers `apply_blurpool` replaced in `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, BlurredLayer)]
