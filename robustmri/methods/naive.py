"""Plain training: the bundle's ``train.json`` with no method handler (the reference every method is compared with)."""

from robustmri.methods import Method

METHOD = Method(name="naive", title="naive training (cross-entropy)", order=0,
                families=("noisy images", "noisy labels"), summary=None, reference="Van, Carey, Wu, arXiv 2403.10698",
                config="train.json")
