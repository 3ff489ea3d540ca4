"""robustmri: brain-tumour MRI classifiers that stay accurate when the training images are noisy.

The library behind the ``bundle/`` MONAI bundle: data and the noise protocol, the
paper's CNN, influence-based training (ISR/ISP) and deployment helpers.
"""

from .catalog import CLASS_NAMES

__version__ = "0.3.1"
__all__ = ["CLASS_NAMES", "__version__"]
