"""The bundled sample pair in Slicer's Sample Data module (File > Download Sample Data).

Two T1 brain MRIs of the IXI validation split (2 mm, CC BY-SA 3.0; see the sample's README). They
ship with the extension, so the Sample Data module "downloads" them from a local ``file:`` URI:
no network is needed.
"""
import os
import pathlib

CATEGORY = "FM-SAM Registration"
SAMPLE_NAME = "FMSAM IXI brain pair (T1)"
#: (file beside the module's sample folder, node name) of the fixed and the moving volume.
SAMPLE_FILES = (("T1/IXI012-HH-1211_T1.nii.gz", "IXI012-HH-1211_T1 (fixed)"),
                ("T1/IXI013-HH-1212_T1.nii.gz", "IXI013-HH-1212_T1 (moving)"))


def sample_folder(module_dir):
    """Where the sample pair lies: ``Resources/SampleData`` in a built extension, the source tree's
    ``Testing/Data/ixi_sample`` otherwise; None when neither has it."""
    for folder in (os.path.join(module_dir, "Resources", "SampleData"),
                   os.path.join(module_dir, "..", "Testing", "Data", "ixi_sample")):
        if all(os.path.isfile(os.path.join(folder, name)) for name, _ in SAMPLE_FILES):
            return os.path.abspath(folder)
    return None


def sample_source(module_dir):
    """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` (those all
    supported Slicer releases accept), or None without the sample files."""
    folder = sample_folder(module_dir)
    if folder is None:
        return None
    paths = [os.path.join(folder, name) for name, _ in SAMPLE_FILES]
    return {"category": CATEGORY, "sampleName": SAMPLE_NAME,
            "uris": [pathlib.Path(path).as_uri() for path in paths],
            "fileNames": [os.path.basename(path) for path in paths],
            "nodeNames": [node_name for _, node_name in SAMPLE_FILES],
            "thumbnailFileName": os.path.join(module_dir, "Resources", "Icons", "FMSAMRegistration.png")}


def register_sample_data(module_dir):
    """Add the pair to the Sample Data module (inside Slicer; does nothing without that module or
    without the files)."""
    source = sample_source(module_dir)
    try:
        import SampleData
    except ImportError:
        return False
    if source is None:
        return False
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
    return True
