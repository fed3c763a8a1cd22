"""BlurPool (Zhang 2019): anti-aliased downsampling by blurring before subsampling.

Every strided conv becomes the same conv at stride 1 followed by a binomial blur that
subsamples, and every strided max-pool becomes a stride-1 max-pool followed by the blur. Convs
reading fewer than `min_channels` channels (the stem on image input) are left alone, as in the
paper's recipe (Composer's BlurPool)."""
import torch.nn as nn
from timm.layers import BlurPool2d


def _stride(m):
    s = m.stride
    return s if isinstance(s, int) else max(s)


def _blurred_conv(conv):
    stride = _stride(conv)
    conv.stride = (1, 1)
    return nn.Sequential(conv, BlurPool2d(conv.out_channels, filt_size=3, stride=stride))


def _blurred_maxpool(pool):
    stride = _stride(pool)
    kept = nn.MaxPool2d(pool.kernel_size, stride=1, padding=pool.padding, dilation=pool.dilation,
                        ceil_mode=pool.ceil_mode)
    return nn.Sequential(kept, BlurPool2d(None, filt_size=3, stride=stride))


def apply_blurpool(model, min_channels=16):
    """Rewrite `model` in place; returns the number of layers replaced."""
    replaced = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d) and _stride(child) > 1 and child.in_channels >= min_channels \
                and child.groups == 1:
            setattr(model, name, _blurred_conv(child))
            replaced += 1
        elif isinstance(child, nn.MaxPool2d) and _stride(child) > 1:
            setattr(model, name, _blurred_maxpool(child))
            replaced += 1
        else:
            replaced += apply_blurpool(child, min_channels)
    return replaced
