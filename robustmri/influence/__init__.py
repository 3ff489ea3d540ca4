"""Influence functions on the final linear layer of any classifier (no MONAI inside).

The interface, in the style of torch-influence and Kronfluence:

- a model is any classifier whose logits are the output of one final ``nn.Linear``;
  :class:`FinalLayer` adapts it to the one contract influence needs,
  :class:`LastLayerModel` (features and logits from one forward pass, and the layer);
- the inverse-Hessian-vector product is a :class:`Solver`, chosen by name
  (:func:`make_solver`: ``exact``, ``lissa``, ``cg``; :data:`DEFAULT_DAMPING`);
- :func:`compute_influence` scores every training sample on the clean validation loss,
  :func:`input_gradients` gives ISP's direction, :func:`self_influence_scores` the label
  review's self-influence (:func:`last_layer_problem`: the closed forms and probabilities it starts from).

Sign convention (stated here once, used everywhere): with v the gradient of the mean
clean-validation loss with respect to the final layer's weight and bias, H the
training-loss Hessian of that layer and s = (H + lambda I)^-1 v,

    score_i = g_i . s / N

is the first-order change of the validation loss when training sample i is removed.
A positive score means the sample is helpful (removing it would raise the validation
loss); a negative score means it is harmful. It equals -I_up,loss / N of Koh & Liang.
Moving an input along +grad_x(g_i . s) raises its score, i.e. lowers the predicted
validation loss: that is the ISP step.
"""

from robustmri.influence.adapter import FinalLayer, FinalLayerError, LastLayerModel, find_final_linear
from robustmri.influence.last_layer import SoftmaxLastLayer, augment
from robustmri.influence.scores import (
                                        InfluenceResult,
                                        collect_features,
                                        compute_influence,
                                        influence_ranking,
                                        influence_scores,
                                        input_gradients,
)
from robustmri.influence.self_influence import last_layer_problem, self_influence_scores
from robustmri.influence.solvers import (
                                        DEFAULT_DAMPING,
                                        SOLVERS,
                                        ConjugateGradientSolver,
                                        ExactSolver,
                                        LissaSolver,
                                        Solver,
                                        make_solver,
)

__all__ = ["DEFAULT_DAMPING", "SOLVERS", "ConjugateGradientSolver", "ExactSolver", "FinalLayer", "FinalLayerError",
           "InfluenceResult", "LastLayerModel", "LissaSolver", "SoftmaxLastLayer", "Solver", "augment",
           "collect_features", "compute_influence", "find_final_linear", "influence_ranking", "influence_scores",
           "input_gradients", "last_layer_problem", "make_solver", "self_influence_scores"]
