"""Instance optimisation: refine the network's result on the one pair being registered.

The forward (fixed -> moving) and backward (moving -> fixed) fields the network predicts are
refined together for a few Adam steps with the training loss (local NCC both ways plus GradICON),
so the result stays inverse-consistent. The refinements are additive corrections stored on a grid
of half the network grid's resolution and upsampled: that keeps them smooth without adding a term
to the loss. uniGradICON fine-tunes the network weights instead; on a CPU one such step costs two
network passes (about 1.5 s here), while a step on the fields costs a few warps (about 0.1 s), so
many more steps fit in the same time.
"""
import math

import torch

from .layers import resize
from .losses import random_subvoxel_offset, symmetric_registration_loss

#: Adam step size in normalised coordinates (0.005 is about 0.2 voxel on an 80-voxel axis). Raised
#: from 2e-3 with accurate mode's steps (50 -> 20, fmsam.options.MODES): the same result, sooner.
DEFAULT_LEARNING_RATE = 5e-3
#: Weight of GradICON in the refinement, whatever weight the model was trained with: it sets how
#: smooth accurate mode's result is. 1.5 gave folding of at most 0.0026 % on 30 IXI pairs; with the
#: weight of a model fine-tuned at 0.75, one pair of the first four already folded 0.019 %.
GRADICON_WEIGHT = 1.5
#: The corrections' grid per axis as a fraction of the fields' grid (0.5: half the network grid's
#: resolution, upsampled; see the module's docstring).
CORRECTION_SCALE = 0.5


def adam_steps(loss_of_step, optimiser, steps, progress=None):
    """Run ``steps`` steps of ``optimiser`` on the scalar ``loss_of_step()``; return the loss before
    each step. ``progress(fraction)`` after every step (it may raise to stop)."""
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            loss = loss_of_step()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress((step + 1) / steps)
    return losses


def instance_optimise(forward, backward, fixed, moving, steps, config,
                      learning_rate=DEFAULT_LEARNING_RATE, progress=None, similarity="lncc"):
    """Return ``(refined forward, refined backward displacement, losses)``, each (1, 3, D, H, W).

    ``similarity``: 'lncc' (the training loss's signed local NCC) or 'squared_lncc' (contrast-
    independent, for pairs whose contrasts differ; :data:`fmsam.losses.SIMILARITIES`).

    ``forward``/``backward``: the network's displacements for (fixed, moving) and (moving, fixed);
    ``fixed``/``moving``: (1, 1, D', H', W') images on the network grid or a finer one over the same
    extent (:func:`fmsam.inference.instance_optimisation_grid`): the fields, which stay on their own
    grid, are then sampled at the images' points. The corrections live on a grid
    :data:`CORRECTION_SCALE` times the fields' per axis (at least 2 voxels). ``losses`` holds the loss
    before each step and after the last. ``progress(fraction)`` is called after every step and may
    raise :class:`fmsam.errors.Cancelled`.
    """
    shape = forward.shape[2:]
    coarse = [max(2, math.ceil(n * CORRECTION_SCALE)) for n in shape]
    corrections = torch.zeros((2, 3) + tuple(coarse), device=forward.device, requires_grad=True)
    optimiser = torch.optim.Adam([corrections], lr=learning_rate)
    start = torch.cat([forward, backward]).detach()

    generator = torch.Generator().manual_seed(0)  # same offsets every run: deterministic output

    images_shape = fixed.shape[2:]
    zero = torch.zeros(3) if tuple(images_shape) != tuple(shape) else None  # fields resampled at the images' points

    def loss_now(offset=zero):
        both = start + resize(corrections, shape)
        loss = symmetric_registration_loss(fixed, moving, both[:1], both[1:],
                                           GRADICON_WEIGHT, config.get("ncc_window", 5), offset,
                                           similarity)[0]
        return loss, both

    losses = adam_steps(lambda: loss_now(random_subvoxel_offset(images_shape, generator))[0], optimiser, steps,
                        progress)
    with torch.no_grad():
        loss, both = loss_now()
    losses.append(float(loss))
    return both[:1], both[1:], losses
