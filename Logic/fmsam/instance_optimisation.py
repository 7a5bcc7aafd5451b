"""Instance optimisation: fine-tune a copy of the network on the one pair being registered.

As in uniGradICON, the network weights (not the field) are optimised for a few steps with the
training loss (local NCC both ways plus GradICON), which keeps the result inverse-consistent and
smooth. The bundled weights are never changed.
"""
import copy

import torch

from .losses import symmetric_registration_loss


def instance_optimise(network, config, fixed, moving, steps, learning_rate=2e-5, progress=None):
    """Return ``(displacement (1, 3, D, H, W), losses)`` after ``steps`` Adam steps on this pair;
    ``losses`` holds the training loss before each step and after the last.

    ``fixed`` and ``moving`` are (1, 1, D, H, W) tensors on the network grid; ``progress(fraction)``
    is called after every step and may raise :class:`fmsam.errors.Cancelled`.
    """
    tuned = copy.deepcopy(network)
    tuned.train()
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(tuned.parameters(), lr=learning_rate)
    both_fixed, both_moving = torch.cat([fixed, moving]), torch.cat([moving, fixed])

    def loss_of(model):
        both = model(both_fixed, both_moving)
        return symmetric_registration_loss(fixed, moving, both[:1], both[1:],
                                           config.get("gradicon_weight", 1.5),
                                           config.get("ncc_window", 5))[0]

    losses = []
    for step in range(steps):
        with torch.enable_grad():
            loss = loss_of(tuned)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress((step + 1) / steps)
    tuned.eval()
    with torch.no_grad():
        losses.append(float(loss_of(tuned)))
        return tuned(fixed, moving), losses
