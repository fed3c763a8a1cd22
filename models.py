"""Models: a small ResNet of our own for 28x28 / 32x32 images, or any timm model by name."""
import functools

import timm
import torch.nn as nn
from timm.layers import DropPath

SMALL_RESNET = "small_resnet"


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, drop_path=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.drop_path(self.bn2(self.conv2(out))) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A narrow 3x3 stem at full resolution, no max-pool, then one basic block per stage, each
    halving the resolution (28 -> 14 -> 7 -> 4): about 1,600 training images/s on a 2-core CPU
    in fp32, and over 90% on Fashion-MNIST in a few epochs. drop_path_rate: stochastic depth on the residual
    branches, rising linearly from 0 at the first block to the rate at the last (as timm's ResNets)."""

    def __init__(self, num_classes=10, in_chans=3, widths=(32, 64, 128), stem_width=16, drop_path_rate=0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width),
                                  nn.ReLU(inplace=True))
        stages, cin = [], stem_width
        for i, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, 2, drop_path_rate * i / max(len(widths) - 1, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                   "checkpoint_path")  # set by train.py (the dataset's), or weights from elsewhere: not options


def parse_model_kwargs(text):
    """--model-kwargs 'key=value,...' as a dict. Values are JSON or Python literals (2, 0.1, true/True, [32, 32],
    (32, 32): a tuple becomes a list, as config.json records it) or else plain words; commas inside brackets or
    quotes do not split. ValueError names what is wrong."""
    import ast
    import json
    import math
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text or ""):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append((text or "")[start:])
    kwargs = {}
    for item in filter(None, (part.strip() for part in items)):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs: '{item}' is not key=value; write e.g. drop_path_rate=0.1,depth=6")
        if key in kwargs or key in RESERVED_KWARGS:
            why = "is given twice" if key in kwargs else "is set by train.py or loads weights: not a model option"
            raise ValueError(f"--model-kwargs: {key} {why}")
        try:
            value = json.loads(raw)
        except ValueError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        value = list(value) if isinstance(value, tuple) else value
        if isinstance(value, str) and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):  # not words
            raise ValueError(f"--model-kwargs: {key}={raw} is not a finite number; give a finite one")
        numbers = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float, bool)) or v is None for v in numbers) or any(
                isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"--model-kwargs: {key}={raw} is not a finite number, a word, or a list of them")
        kwargs[key] = value
    return kwargs


def build_model(name, num_classes, in_chans, model_kwargs=None):
    """`small_resnet`, or any name timm.create_model knows (randomly initialised), with `model_kwargs` passed to
    timm (drop_rate, drop_path_rate, img_size, depth, ...). ValueError names the option: an option the model does not
    take, a value it cannot be built with, a word where the model's default is a number."""
    model_kwargs = model_kwargs or {}
    if name == SMALL_RESNET:
        other = sorted(set(model_kwargs) - {"drop_path_rate"})
        if other:
            raise ValueError(f"--model-kwargs: {SMALL_RESNET} takes only drop_path_rate (got {', '.join(other)}); the "
                             f"others are for timm models")
        check_kinds(name, SmallResNet, model_kwargs)
        make = functools.partial(SmallResNet, num_classes, in_chans, **model_kwargs)
    elif not timm.is_model(name):
        raise ValueError(f"--model: unknown model '{name}'; use {SMALL_RESNET} or a timm model name "
                         f"(python -c \"import timm; print(timm.list_models('resnet*'))\")")
    else:
        make = functools.partial(timm.create_model, name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_chans, **model_kwargs)
    try:
        model = make()
    except Exception as e:  # whatever a model's constructor makes of a bad value: one line, not a traceback
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            raise ValueError(f"--model-kwargs: {name} does not take {', '.join(model_kwargs)} ({e})") from None
        given = ",".join(f"{k}={v}" for k, v in model_kwargs.items())
        raise ValueError(f"--model-kwargs {given}: {name} cannot be built with these values "
                         f"({error_line(e)}); fix the value") from None
    check_kinds(name, type(model), model_kwargs)  # a word a timm model stores and only its forward pass reads
    return model


def error_line(e):
    """An exception as one line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def check_kinds(name, cls, model_kwargs):
    """ValueError where a --model-kwargs value is a word but `cls`'s default for it is a number (drop_rate=abc)."""
    import inspect
    params = inspect.signature(cls.__init__).parameters
    for key, value in model_kwargs.items():
        default = params[key].default if key in params else None
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            raise ValueError(f"--model-kwargs: {key}={value} is not a number; {name} takes a number there "
                             f"(default {default})")


def fixed_input_size(model):
    """(height, width) a model only takes (timm's ViT, Swin, Mixer: a patch embedding of strict size), or None."""
    return next((tuple(m.img_size) for m in model.modules() if getattr(m, "strict_img_size", False)
                 and getattr(m, "img_size", None) is not None), None)
