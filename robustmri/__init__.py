"""robustmri: brain-tumour MRI classifiers that stay accurate when the training images are noisy.

The library behind the ``bundle/`` MONAI bundle, in packages by role (each imports only
from those listed before it):

- ``networks``: the paper's CNN and the eval-mode helper;
- ``data``: readers, catalog, patient-grouped splits, image and label noise, the synthetic
  set, preprocessing, the protocol, batching;
- ``influence``: last-layer influence maths, inverse-Hessian solvers, the final-layer
  adapter for any classifier, self-influence;
- ``engine``: what the bundle's trainers share (the once-after-epoch handler, weighted
  loss, predictions, training history, config files that extend others, workflows);
- ``evaluation``: metrics, test reports, checkpoints;
- ``methods``: one module per training method (file name = config name = option
  prefix) and the registry that lists them;
- ``deploy``: file inference; ``deploy.onnx``: export, runtime, trust, OOD detector; ``deploy.dicom``: DICOM
  series and study inference, DICOM SR;
- ``review``: label review (review orders by name, scoring labelled images);
- ``bench``: the benchmark engine (profiles, runs, resume), its report, and the synthetic DICOM series
  tests and benchmarks write.
"""

#: The classes, in label order (label 0, 1, 2); kept here so that importing the package imports nothing else.
CLASS_NAMES = ("meningioma", "glioma", "pituitary")
#: What the model is for, stated in every output (DICOM SR, every JSON the product writes, the model metadata, MONAI
#: Label, the docs): defined once here so that no output can drift from another.
INTENDED_USE = (
    "Classifies the tumour type (meningioma, glioma or pituitary tumour) of a T1-weighted contrast-enhanced "
    "brain MRI slice or series that is already known to contain one of these tumours. It does not detect "
    "tumours: an image without a tumour is still given one of the three types unless the model flags it as "
    "not assessable, so an answer never means that a tumour is present. Research software, not for clinical use."
)

__version__ = "0.9.0"
__all__ = ["CLASS_NAMES", "INTENDED_USE", "__version__"]
