"""ISP, Influence-based Sample Perturbation (Algorithm 2 of Van, Carey and Wu, arXiv 2403.10698).

After epoch T_pre each selected training image takes one step along the direction that the
influence function predicts lowers the clean validation loss (sign convention of
:mod:`robustmri.influence`), and the perturbed image replaces the original for the remaining
epochs. :func:`select_for_perturbation`, :func:`perturbation_step`, :func:`control_step` and
:func:`perturb` are the maths; :class:`ISPHandler` the bundle's handler (``isp.json``).

Two forms of the step: the authors' unscaled ``x + step * d`` (``budget=None``, the
default), whose size depends on the gradient's scale and hence on the solver's damping, and
a budgeted one whose per-image L-inf or L2 norm is ``budget`` in image-intensity units. For
ablations, ``orientation="harmful"`` flips the step and ``control=True`` replaces its
direction by a seeded random one of the same per-image norm (no influence signal).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from robustmri.data.batching import item_batches
from robustmri.influence import input_gradients
from robustmri.influence.distributed import shard_bounds
from robustmri.engine.distributed import is_distributed, is_main_process, rank, world_size
from robustmri.methods import Method
from robustmri.engine.influence_step import InfluenceStep, plot_influence_examples
from robustmri.options import as_flag
from robustmri.progress import progress

METHOD = Method(name="isp", title="ISP: influence-based sample perturbation", order=4,
                families=("noisy images",), summary="influence_summary.json",
                reference="Van, Carey, Wu, arXiv 2403.10698, Algorithm 2", builds_on=("influence",))

SELECTIONS = ("harmful", "influential")
DIRECTIONS = ("gradient", "sign")
QUANTISATIONS = ("float", "uint8_truncate")
NORMS = ("linf", "l2")
ORIENTATIONS = ("helpful", "harmful")
#: The unbudgeted form's defaults: a budget replaces them, so with a budget they must stay as they are.
DEFAULT_STEP, DEFAULT_DIRECTION = 0.1, "gradient"


def select_for_perturbation(scores: torch.Tensor, ratio: float = 1.0, selection: str = "harmful") -> torch.Tensor:
    """Indices of the ``ratio`` share of samples to perturb, most harmful (lowest score) or
    most influential (largest |score|) first; ratio 1.0 takes every sample, as the reference."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    key = scores if selection == "harmful" else -scores.abs()
    count = max(1, round(ratio * len(scores)))
    return torch.argsort(key)[:count]


def check_perturb_options(step: float = DEFAULT_STEP, direction: str = DEFAULT_DIRECTION,
                          epsilon: float | None = None, quantisation: str = "float", budget: float | None = None,
                          norm: str = "linf", orientation: str = "helpful") -> None:
    """Raise ValueError for an unknown or contradictory option of :func:`perturb`.

    A budget fixes the step's size and direction by itself, so ``step``, ``direction`` and
    ``epsilon`` (which belong to the unbudgeted form) must stay at their defaults with one.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if quantisation not in QUANTISATIONS:
        raise ValueError(f"quantisation must be one of {QUANTISATIONS}, got {quantisation!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if budget is not None:
        if not budget > 0:
            raise ValueError(f"budget must be positive (or None for the unbudgeted form), got {budget}")
        if step != DEFAULT_STEP or direction != DEFAULT_DIRECTION or epsilon is not None:
            raise ValueError(f"a budget sets the step by itself (norm {norm!r}): leave step ({DEFAULT_STEP}), "
                             f"direction ({DEFAULT_DIRECTION!r}) and epsilon (None) at their defaults, got "
                             f"step {step}, direction {direction!r}, epsilon {epsilon}")


def _per_image(norms: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] norms reshaped to broadcast over images shaped like ``like`` ([B, ...])."""
    return norms.reshape(-1, *([1] * (like.dim() - 1)))


def per_image_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf and L2 norm of every image of a batch ([B, ...]), each [B]."""
    flat = delta.reshape(len(delta), -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(len(delta)), flat.new_zeros(len(delta))
    return flat.abs().amax(1), flat.norm(dim=1)


def perturbation_step(gradients: torch.Tensor, step: float = DEFAULT_STEP, direction: str = DEFAULT_DIRECTION,
                      budget: float | None = None, norm: str = "linf", orientation: str = "helpful") -> torch.Tensor:
    """The influence step delta for a batch of input gradients g = grad_x(g_i . s) ([B, ...]).

    Without a budget: ``step * g`` or ``step * sign(g)`` (the authors' form). With one:
    ``budget * sign(g)`` for norm ``linf`` (every pixel with a gradient moves by exactly
    budget) or ``budget * g / ||g||_2`` per image for ``l2`` (zero for a zero gradient), so
    the size no longer depends on the gradient's scale or the solver's damping.
    ``orientation="harmful"`` returns exactly the negative step.
    """
    if budget is None:
        delta = step * (gradients.sign() if direction == "sign" else gradients)
    elif norm == "linf":
        delta = budget * gradients.sign()
    else:
        length = _per_image(per_image_norms(gradients)[1], gradients)
        delta = torch.where(length > 0, budget * gradients / length.clamp_min(torch.finfo(gradients.dtype).tiny),
                            torch.zeros_like(gradients))
    return -delta if orientation == "harmful" else delta


def image_generator(seed: int, image_id: int) -> torch.Generator:
    """A CPU generator seeded from (seed, image id): the same draw for an image whatever its batch."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFF]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def control_step(delta: torch.Tensor, norm: str, seed: int, ids: Sequence[int]) -> torch.Tensor:
    """Random directions with the per-image norm of ``delta`` (the no-signal control).

    ``norm="linf"``: random signs times max|delta| (every pixel moves by the L-inf norm);
    ``"l2"``: a Gaussian direction scaled to ||delta||_2. Image k draws from
    :func:`image_generator` (seed, ids[k]), so the result does not depend on batch order.
    """
    if len(ids) != len(delta):
        raise ValueError(f"control_step needs one id per image: {len(ids)} ids for {len(delta)} images")
    linf, l2 = per_image_norms(delta)
    rows = []
    for k, image_id in enumerate(ids):
        noise = torch.randn(delta.shape[1:], generator=image_generator(seed, image_id), dtype=torch.float64)
        if norm == "linf":
            rows.append(noise.sign() * linf[k].item())
        else:
            length = noise.norm()
            rows.append(noise * (l2[k].item() / length.item()) if length > 0 else torch.zeros_like(noise))
    return torch.stack(rows).to(delta.device, delta.dtype) if rows else torch.zeros_like(delta)


def perturb(images: torch.Tensor, gradients: torch.Tensor, step: float = DEFAULT_STEP,
            direction: str = DEFAULT_DIRECTION, epsilon: float | None = None, quantisation: str = "float",
            budget: float | None = None, norm: str = "linf", orientation: str = "helpful", control: bool = False,
            seed: int = 0, ids: Sequence[int] | None = None) -> torch.Tensor:
    """x + delta (:func:`perturbation_step`) within an optional L-inf cap ``epsilon``, clipped to [0, 1].

    The defaults are the authors' x + 0.1 * grad_x(g . s). With ``control`` the direction is
    random (:func:`control_step`, seeded by ``seed`` and the images' ``ids``, default their
    positions) with the same per-image norm as the influence step: L-inf for a ``linf``
    budget, L2 otherwise (also in the unbudgeted form); the cap and clipping then apply alike.
    ``quantisation="uint8_truncate"`` casts to 8 bits by truncation as the reference code
    does (a small negative step always loses one grey level).
    """
    check_perturb_options(step, direction, epsilon, quantisation, budget, norm, orientation)
    delta = perturbation_step(gradients, step, direction, budget, norm, orientation)
    if control:
        delta = control_step(delta, norm if budget is not None else "l2", seed,
                             list(range(len(images))) if ids is None else ids)
    if epsilon is not None:
        delta = delta.clamp(-epsilon, epsilon)
    perturbed = (images + delta).clamp(0.0, 1.0)
    if quantisation == "uint8_truncate":
        perturbed = torch.floor(perturbed * 255.0) / 255.0
    return perturbed


def _stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


class ISPHandler(InfluenceStep):
    """Influence-based Sample Perturbation: one persisted step per selected training image.

    ``budget``/``norm`` give the step a size in image-intensity units (None: the authors'
    ``step * d``), ``orientation`` its sign, and ``control`` a random direction of the same
    norm (seeded by ``seed`` and each image's id); the selection of images is the same in all.
    """

    method = "ISP"

    def __init__(self, *args, step: float = DEFAULT_STEP, direction: str = DEFAULT_DIRECTION,
                 epsilon: float | None = None, quantisation: str = "float", ratio: float = 1.0,
                 selection: str = "harmful", budget: float | None = None, norm: str = "linf",
                 orientation: str = "helpful", control: bool = False, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        control = as_flag(control, "control")  # the command line passes --isp_control true as a string
        self.options = {"step": float(step), "direction": direction, "epsilon": epsilon, "quantisation": quantisation,
                        "budget": None if budget is None else float(budget), "norm": norm,
                        "orientation": orientation, "control": control, "seed": int(seed)}
        self.ratio, self.selection = float(ratio), selection
        check_perturb_options(**{k: v for k, v in self.options.items() if k not in ("control", "seed")})
        select_for_perturbation(torch.zeros(2), self.ratio, selection)  # validate the options now
        self.changed = 0
        self.achieved: dict[str, dict[str, float]] = {}
        self.perturbed_ids: list[int] = []  # ids of the images the step replaced
        self.traffic: dict | None = None  # under torchrun: what sharing the perturbed images cost

    def apply(self, network: nn.Module, device: torch.device, positions: list[int]) -> dict[str, np.ndarray]:
        """Perturb the selected images; under ``torchrun`` each rank its contiguous shard of rows, then every
        rank receives the others' perturbed images (:meth:`_share`), so all hold the whole perturbed set."""
        s = self.result.s.to(device)
        chosen = select_for_perturbation(self.result.scores, self.ratio, self.selection).tolist()
        ids = self.result.ids.tolist()
        linf = np.zeros(len(positions))
        l2 = np.zeros(len(positions))
        order = np.argsort(self.result.scores.numpy())
        examples = set(order[:3].tolist() + order[-3:].tolist())  # most harmful and most helpful
        low, high = shard_bounds(len(positions), rank(), world_size())
        mine = [row for row in chosen if low <= row < high]
        before, deltas, changed = {}, {}, {}
        start = time.perf_counter()
        for start_row in progress(range(0, len(mine), self.batch_size), "ISP: input gradients"):
            rows = mine[start_row:start_row + self.batch_size]
            batch = next(item_batches(self.train_data, len(rows), [positions[r] for r in rows]))
            images = batch["image"].to(device)
            gradients = input_gradients(network, images, batch["label"].to(device), s)
            perturbed = perturb(images, gradients, **self.options, ids=[ids[r] for r in rows])
            change = (perturbed - images).detach()
            for k, row in enumerate(rows):
                changed[row] = perturbed[k].detach().cpu().numpy().astype(np.float32)
                linf[row] = change[k].abs().max().item()
                l2[row] = change[k].norm().item()
                if row in examples:
                    before[row] = images[k, 0].cpu().numpy()
                    deltas[row] = change[k, 0].cpu().numpy()
        if is_distributed():
            changed, before, deltas = self._share(changed, linf, l2, before, deltas)
        for row, image in changed.items():
            self.train_data[positions[row]]["image"] = image
        self.timings["input_gradients_s"] = time.perf_counter() - start
        self.perturbed_ids = [int(ids[r]) for r in chosen]
        self.changed = len(chosen)
        self.achieved = {"linf": _stats(linf[chosen]), "l2": _stats(l2[chosen])}
        rows = sorted(before, key=lambda r: self.result.scores[r].item())
        if is_main_process():
            plot_influence_examples([before[r] for r in rows], [deltas[r] for r in rows],
                                    self.result.scores.numpy()[rows], self.class_names,
                                    self.result.labels.numpy()[rows],
                                    os.path.join(self.output_dir, "influence_examples.png"))
        return {"perturbation_linf": linf, "perturbation_l2": l2}

    def _share(self, changed: dict, linf: np.ndarray, l2: np.ndarray, before: dict, deltas: dict):
        """All-gather every rank's perturbed images (float32, with their rows and step norms) and example
        pictures; fills ``linf`` and ``l2`` in place; records what this rank sent: in all, and per image without the
        (at most six) example pictures for ``influence_examples.png``."""
        rows = sorted(changed)
        payload = {"rows": rows, "images": np.stack([changed[r] for r in rows]) if rows else None,
                   "linf": linf[rows], "l2": l2[rows], "before": before, "deltas": deltas}
        sent = len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))  # what all_gather_object sends
        pictures = len(pickle.dumps({"before": before, "deltas": deltas}, protocol=pickle.HIGHEST_PROTOCOL))
        parts = [None] * world_size()
        torch.distributed.all_gather_object(parts, payload)
        changed, before, deltas = {}, {}, {}
        for part in parts:
            for k, row in enumerate(part["rows"]):
                changed[row] = part["images"][k]
            linf[part["rows"]], l2[part["rows"]] = part["linf"], part["l2"]
            before.update(part["before"])
            deltas.update(part["deltas"])
        self.traffic = {"ranks": world_size(), "bytes_sent": sent, "images_sent": len(rows),
                        "bytes_per_image": (sent - pictures) / len(rows) if rows else None,
                        "example_picture_bytes": pictures,
                        "image_bytes": int(changed[rows[0]].nbytes) if rows else None}
        return changed, before, deltas

    def training_state(self) -> dict:
        """The done flag and the perturbed images by id (float32, as trained on), for resuming a run."""
        state = super().training_state()
        by_id = {int(item["id"]): item for item in self.train_data}
        images = [torch.from_numpy(np.asarray(by_id[i]["image"], dtype=np.float32)) for i in self.perturbed_ids]
        return {**state, "ids": torch.tensor(self.perturbed_ids, dtype=torch.long),
                "images": torch.stack(images) if images else torch.zeros(0)}

    def load_training_state(self, state: dict) -> None:
        """Put the perturbed images back into the training items (the same list the data loader reads)."""
        super().load_training_state(state)
        by_id = {int(item["id"]): item for item in self.train_data}
        ids = [int(i) for i in state["ids"].tolist()]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"ISP state: {len(missing)} perturbed image ids are not in the training data "
                             f"(first {missing[0]}): resume with the data that wrote it")
        for i, image in zip(ids, state["images"]):
            by_id[i]["image"] = image.cpu().numpy().astype(np.float32)
        self.perturbed_ids, self.changed = ids, len(ids)

    def extra_summary(self) -> dict:
        """The options (as isp.json ids) and the achieved per-image step norms of the perturbed images."""
        options = {f"isp_{k}": v for k, v in self.options.items() if k != "seed"}
        return {**options, "isp_ratio": self.ratio, "isp_selection": self.selection, "seed": self.options["seed"],
                "perturbed": self.changed, "perturbation_linf": self.achieved.get("linf"),
                "perturbation_l2": self.achieved.get("l2"),
                **({"distributed_exchange": self.traffic} if self.traffic else {})}

    def describe(self) -> str:
        o = self.options
        size = (f"step {o['step']:g}, {o['direction']}" if o["budget"] is None
                else f"{o['norm']} budget {o['budget']:g}")
        control = ", random-direction control" if o["control"] else ""
        return f"; {self.changed} images perturbed ({size}, {o['orientation']}{control})"
