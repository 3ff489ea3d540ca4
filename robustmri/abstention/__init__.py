"""Abstention: when the model cannot vouch for an input it says so and issues no class.

Convention, stated once for every score in this package: **a score is higher for inputs the
model can vouch for less** (higher = more out of distribution, or more likely wrong). A slice
whose score is above the checkpoint's ``threshold`` is *not assessable*.

:mod:`robustmri.abstention.state` holds what a checkpoint carries beside it (the fitted score's
parameters, its threshold and where both came from), so that file inference, export, DICOM
inference and MONAI Label apply one and the same abstention. :mod:`robustmri.abstention.fit` fits it
(``fit_state``), applies it (``scores_of``) and makes sure a checkpoint has one (``ensure_state``);
:class:`robustmri.abstention.handler.FitAbstention` fits it when training completes.
"""

from robustmri.abstention.state import AbstentionState, abstention_path, load_state, save_state

__all__ = ["AbstentionState", "abstention_path", "load_state", "save_state"]
