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

__version__ = "0.9.0"
__all__ = ["CLASS_NAMES", "__version__"]
