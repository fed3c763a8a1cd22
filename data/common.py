"""What every data path shares: the datasets' names and statistics, the one error they raise, normalisation, and
where each step's images and draws come from (an epoch's generator, a rank's slots of the global batch)."""
import torch

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")

# Per-channel mean and std of the training images (0-1 scale).
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


class DataError(ValueError):
    """A dataset that cannot be found or read; the message names the flag and the fix."""


def epoch_generator(seed, epoch, salt=0):
    """A CPU generator that depends only on the integers (seed, epoch, salt): the source of every data draw."""
    return torch.Generator().manual_seed(hash((seed, epoch, salt)) & 0x7FFF_FFFF_FFFF_FFFF)


def rank_slots(step, batch_size, rank, world_size):
    """The positions in the epoch's order that `rank` trains on at `step`: its slice of the global batch."""
    local = batch_size // world_size
    lo = step * batch_size + rank * local
    return slice(lo, lo + local)


def normalize(x_uint8, mean, std):
    """uint8 images as floats normalised per channel (mean and std on the 0-255 scale), in their memory layout."""
    return x_uint8.float().sub_(mean).div_(std)  # in place on the new float tensor: one allocation
