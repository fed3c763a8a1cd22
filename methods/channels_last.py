"""Channels-last memory format (NHWC) for the model's 4-D weights and every input batch."""
import torch


def to_channels_last(tensor_or_model):
    """A model's 4-D parameters and buffers, or a 4-D batch, in torch.channels_last."""
    if isinstance(tensor_or_model, torch.nn.Module):
        return tensor_or_model.to(memory_format=torch.channels_last)
    return tensor_or_model.contiguous(memory_format=torch.channels_last)
