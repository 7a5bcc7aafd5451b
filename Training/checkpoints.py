"""Training checkpoints, and networks from a checkpoint or an exported weights file.

A checkpoint (``latest.pt``, ``best.pt`` of a run) holds ``network`` (state dict), ``optimizer``,
``step``, ``best_dice`` and ``config`` (the network options); a weights file (``fmsam.weights``
format) holds ``state_dict`` and ``config``. Both are read by :func:`fmsam.weights.read_state`.
"""
import os

import torch

from fmsam.networks import build_network
from fmsam.weights import read_state


def save_checkpoint(path, network, optimizer, step, best_dice, config):
    """Write a checkpoint atomically (a half-written file never replaces a good one)."""
    state = {"network": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "best_dice": best_dice, "config": config}
    temporary = path + ".partial"
    torch.save(state, temporary)
    os.replace(temporary, path)


def network_from(state, config):
    """The network in eval mode that ``config`` describes, holding the weights ``state``."""
    network = build_network(config)
    network.load_state_dict(state)
    return network.eval()


def load_network(path):
    """``(network in eval mode, config)`` from a checkpoint or weights file."""
    state, config, _ = read_state(path)
    return network_from(state, config), config
