"""How results look in Slicer: the Jacobian colour map and legend, and the slice-view layers.

The Jacobian map uses a diverging table centred on det J = 1 (no volume change, white): blue for
contraction, red for expansion, and one saturated green for folding (det J < 0), a colour the
blue-white-red scale never reaches. The table covers det J from JACOBIAN_MIN to JACOBIAN_MAX in
steps of JACOBIAN_STEP, so that det J = 0 falls exactly on a table-entry boundary.
"""
import slicer

from .mrml_io import nodes_of_class

JACOBIAN_COLOR_NODE_NAME = "FM-SAM Jacobian (folding green)"
JACOBIAN_MIN, JACOBIAN_MAX, JACOBIAN_STEP = -0.25, 2.25, 0.01
FOLDING_RGB = (0.0, 0.9, 0.0)
CONTRACTION_RGB = (0.02, 0.19, 0.59)   # det J = 0
EXPANSION_RGB = (0.60, 0.0, 0.05)      # det J = JACOBIAN_MAX
_ATTRIBUTE = "FMSAMRegistration.JacobianColors"
SLICE_VIEWS = ("Red", "Yellow", "Green")


def _blend(a, b, t):
    return tuple(x + (y - x) * t for x, y in zip(a, b))


def jacobian_color(value):
    """RGB of the Jacobian table for one det J value (also used to test the table)."""
    if value < 0.0:
        return FOLDING_RGB
    if value <= 1.0:
        return _blend(CONTRACTION_RGB, (1.0, 1.0, 1.0), value)
    return _blend((1.0, 1.0, 1.0), EXPANSION_RGB, min((value - 1.0) / (JACOBIAN_MAX - 1.0), 1.0))


def jacobian_color_node(scene):
    """The scene's Jacobian colour table, created on first use (one per scene, saved with it)."""
    for node in nodes_of_class(scene, "vtkMRMLColorTableNode"):
        if node.GetAttribute(_ATTRIBUTE) == "1":
            return node
    entries = int(round((JACOBIAN_MAX - JACOBIAN_MIN) / JACOBIAN_STEP))
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(JACOBIAN_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(entries)
    for index in range(entries):
        centre = JACOBIAN_MIN + (index + 0.5) * JACOBIAN_STEP
        node.SetColor(index, "%.3f" % centre, *jacobian_color(centre), 1.0)
    node.SetAttribute(_ATTRIBUTE, "1")
    node.SetDescription("det J of a displacement field: green < 0 (folding), blue < 1 (contraction), "
                        "white = 1, red > 1 (expansion)")
    scene.AddNode(node)
    return node


def show_jacobian(jacobian_node, color_logic=None):
    """Give a Jacobian volume its colour table, fixed window/level and a colour legend."""
    scene = jacobian_node.GetScene()
    if jacobian_node.GetDisplayNode() is None:
        jacobian_node.CreateDefaultDisplayNodes()
    display = jacobian_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(JACOBIAN_MIN, JACOBIAN_MAX)
    display.SetInterpolate(False)  # folding voxels stay visible as voxels
    if color_logic is not None:
        legend = color_logic.GetColorLegendDisplayNode(jacobian_node) or \
            color_logic.AddDefaultColorLegendDisplayNode(jacobian_node)
        if legend is not None:
            legend.SetTitleText("det J")
            legend.SetLabelFormat("%.2f")
            legend.SetNumberOfLabels(6)
    return display


def ensure_slice_views(scene):
    """The slice-composite nodes (layer choices) of the three standard views.

    The application has them; a headless scene gets them here, tagged as Slicer tags its own, so a
    saved scene restores the layers when Slicer opens it."""
    composites = {}
    for name in SLICE_VIEWS:
        composite = None
        for node in nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
            if node.GetLayoutName() == name:
                composite = node
        if composite is None:
            composite = slicer.vtkMRMLSliceCompositeNode()
            composite.SetSingletonTag(name)
            composite.SetLayoutName(name)
            scene.AddNode(composite)
        composites[name] = composite
    return composites


def show_layers(scene, background, foreground=None, foreground_opacity=0.5, views=SLICE_VIEWS):
    """Put volumes into slice views: ``background`` under ``foreground`` at the given opacity."""
    composites = ensure_slice_views(scene)
    for name in views:
        composite = composites[name]
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(foreground_opacity if foreground is not None else 0.0)
