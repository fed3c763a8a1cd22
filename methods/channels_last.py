"""Channels-last memory format (NHWC) for the model's 4-D weights and every input batch."""
import torch

from methods.api import Method


def to_channels_last(tensor_or_model):
    """A model's 4-D parameters and buffers, or a 4-D batch, in torch.channels_last."""
    if isinstance(tensor_or_model, torch.nn.Module):
        return tensor_or_model.to(memory_format=torch.channels_last)
    return tensor_or_model.contiguous(memory_format=torch.channels_last)


class ChannelsLast(Method):
    """--method channels_last (alias --channels-last): the model and every batch, training and validation, in NHWC.
    Runs last among the batch transforms (order 90): the layout of what the model finally sees."""
    name, short, order = "channels_last", "cl", 90

    def apply_model(self, model):
        if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            self.no_effect = "no convolution for a memory format"
        return to_channels_last(model)

    def transform_batch(self, x, y, ctx):
        return to_channels_last(x), y

    def transform_eval_batch(self, x):
        return to_channels_last(x)

    @staticmethod
    def add_alias_flags(group):
        group.add_argument("--channels-last", action="store_true", help="= --method channels_last (NHWC)")

    @staticmethod
    def from_alias_flags(args):
        return {} if args.channels_last else None
