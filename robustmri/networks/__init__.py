"""Networks: the paper's CNN (``robustmri.networks.PaperCNN`` in the bundle's ``network_def``)
and :func:`eval_mode`, the one way the library runs a network in eval mode and puts it back."""

from robustmri.networks.modes import eval_mode
from robustmri.networks.paper_cnn import PaperCNN

__all__ = ["PaperCNN", "eval_mode"]
