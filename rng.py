"""The global random streams (torch's CPU and CUDA generators, NumPy's, Python's) taken and put back: checkpoints
carry them, and every pass that must leave no trace (the start-up trial pass, --amp auto's timing, the check of
a model's options) puts them back after."""
import random

import numpy as np
import torch


def rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
                python=list(random.getstate()[1]))


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate((3, tuple(state["python"]), None))
