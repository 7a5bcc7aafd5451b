"""The engine's choices, in one place: what each option accepts and what each mode means.

Imports nothing heavy (no PyTorch, no SimpleITK), so the command line, the Slicer module and the
benchmarks read their choices from here before anything is loaded.
"""

#: ``device``: CUDA when one is usable, else the CPU; or either, explicitly.
DEVICES = ("auto", "cpu", "cuda")
#: ``modality``: intensity normalisation, detected per image or forced (see :mod:`fmsam.intensity`).
MODALITIES = ("auto", "mr", "ct")
#: ``contrast_matching``: give the moving image the fixed image's contrast before the network
#: ('auto': when their contrasts differ; see :mod:`fmsam.contrast`).
CONTRAST_MATCHING = ("auto", "on", "off")
#: ``slice_refinement``: give each slice of a thick-slice stack its own in-plane correction after the
#: network ('auto': when the fixed image is such a stack of 2 to 32 slices; see
#: :mod:`fmsam.slice_refinement`) or 'off'.
SLICE_REFINEMENT = ("off", "auto")
#: The default of ``slice_refinement`` (the command line's, the API's, the Slicer module's).
DEFAULT_SLICE_REFINEMENT = "auto"
#: The modes and their instance-optimisation steps: 'fast' is the network alone (symmetric
#: inference, smoothed), 'accurate' refines the network's fields on the pair for 18 steps (Adam at
#: fmsam.instance_optimisation.DEFAULT_LEARNING_RATE, 5e-3); on a stack that slice refinement
#: refines, the refinement takes their place. On the first 10 pairs of
#: Testing/Benchmarks/ixi_val_pairs30.csv 20 such steps reached Dice 0.687 in 31 s where 50 steps
#: at 2e-3 had reached 0.691 in about 85 s; 18 keep accurate mode within 30 s on two cores
#: (docs/benchmarks.md, "Speed and scale").
MODES = {"fast": 0, "accurate": 18}
#: Most instance-optimisation steps accepted: one step takes about 1.5 s on two CPU cores (a 2 mm head), 2000 about an hour.
MAX_IO_STEPS = 2000
#: The stages of a registration, in order, as progress callbacks name them, with their titles.
STAGE_TITLES = {
    "prepare": "Preparing images", "affine": "Affine pre-alignment", "network": "Running the network",
    "instance_optimisation": "Instance optimisation", "compose": "Composing the transform",
    "warp": "Warping the moving volume", "jacobian": "Jacobian determinant",
}
STAGES = tuple(STAGE_TITLES)


def io_steps_of(mode):
    """Instance-optimisation steps of a mode name ('fast' or 'accurate')."""
    if mode not in MODES:
        raise ValueError("mode must be one of %s, not %r" % (", ".join(MODES), mode))
    return MODES[mode]
