"""The paper's noisy-data protocol, built once per run.

All training images noisy, validation clean, a fraction ``test_noise_fraction`` of
test images noisy. Optionally the training split also gets wrong labels (``label_noise``
at ``label_noise_rate``) and fewer samples of some classes (``imbalance``), see
:mod:`robustmri.data.label_noise`; validation and test labels stay true. The noise is part of the data: sample ``i`` under seed ``s``
always gets the same realisation (generator seeded with ``(s, i)``), so every method
compared under one seed sees the same split and the same noisy pixels.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from robustmri import CLASS_NAMES
from robustmri.data.catalog import check_on_error, handle_bad_item, scan_dataset
from robustmri.data.label_noise import flip_labels, noisy_label_record, parse_imbalance, subsample_classes
from robustmri.data.noise import NOISE_TYPES, PAPER_SIGMA, apply_noise, reference_rician_field
from robustmri.data.preprocessing import DEFAULT_PREPROCESS, preprocessing_by_name, read_preprocessed
from robustmri.data.readers import ImageReadError
from robustmri.data.splits import SPLIT_NAMES, grouped_stratified_split
from robustmri.data.synthetic import generate_slices

logger = logging.getLogger(__name__)

#: Environment variable naming a data set folder when the config gives none.
DATA_ENV = "BRAIN_TUMOR_DATA"


@dataclass
class ProtocolData:
    """Train / validation / test items as MONAI-style dicts (image [1, H, W] in [0, 1])."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    class_names: tuple[str, ...]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    label_noise: dict | None = None  # counts of flipped training labels, when simulated
    #: the test split again with other shares of noisy images (``test_noise_fractions``), keyed by the share
    test_at: dict[float, list[dict]] = field(default_factory=dict)
    #: the test split at those shares under other noise models (``test_noises``): ``{noise: {share: items}}``;
    #: how a model trained on clean images fares on the noisy test images of noisy-trained runs
    test_under: dict[str, dict[float, list[dict]]] = field(default_factory=dict)
    #: the settings the protocol was built with (no paths), for the model's provenance record:
    #: ``data_kind`` ("synthetic" or "folder"), seed, split fractions, noise, ... (:func:`build_protocol`)
    settings: dict = field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        return getattr(self, name)

    def with_front_end(self, front_end: Callable[[str, list[dict]], list[dict]]) -> "ProtocolData":
        """A copy with ``front_end(name, items)`` applied to every split and every test variant.

        A front end that changes images (a denoiser, a filter) must see the training split and every image
        the model is evaluated on alike, or the comparison mixes processed and raw test images. ``name`` is
        ``"train"``, ``"val"``, ``"test"``, ``"test_at_<share>"`` or ``"test_under_<noise>_<share>"``, for the
        front end's own bookkeeping. ``self`` is not changed.
        """
        splits = {name: front_end(name, self.split(name)) for name in SPLIT_NAMES}
        test_at = {share: front_end(f"test_at_{share:g}", items) for share, items in self.test_at.items()}
        test_under = {noise: {share: front_end(f"test_under_{noise}_{share:g}", items)
                              for share, items in by_share.items()}
                      for noise, by_share in self.test_under.items()}
        return replace(self, **splits, test_at=test_at, test_under=test_under)

    def summary(self) -> dict:
        """Counts only: safe to log (no file names, no patient ids)."""
        counts = {}
        for name in SPLIT_NAMES:
            items = self.split(name)
            counts[name] = {
                "total": len(items),
                "noisy": int(sum(item["noisy"] for item in items)),
                **{cls: int(sum(item["label"] == k for item in items)) for k, cls in enumerate(self.class_names)},
            }
        summary = {"source": self.source, "skipped": len(self.skipped), "splits": counts}
        if self.label_noise is not None:
            summary["label_noise"] = self.label_noise
        return summary


def resolve_dataset_dir(dataset_dir: str | None) -> str | None:
    """The config's ``dataset_dir``, else $BRAIN_TUMOR_DATA, else None (embedded synthetic set)."""
    value = dataset_dir or os.environ.get(DATA_ENV, "")
    return os.path.abspath(value) if value else None


def build_protocol(
    dataset_dir: str | None = None,
    spatial_size: int = 256,
    noise: str = "gaussian",
    sigma: float = PAPER_SIGMA,
    test_noise_fraction: float = 1.0,
    seed: int = 0,
    split_fractions=(0.75, 0.05, 0.20),
    synthetic_patients: int = 300,
    class_names=CLASS_NAMES,
    on_error: str = "raise",
    num_workers: int = 4,
    label_noise: str = "none",
    label_noise_rate: float = 0.0,
    imbalance: dict | None = None,
    test_noise_fractions=(),
    preprocess: str = DEFAULT_PREPROCESS,
    test_noises=(),
) -> ProtocolData:
    """Load (or generate), split by patient and add the protocol's fixed noise.

    With ``label_noise`` other than "none", training items carry ``true_label`` next to the
    (possibly wrong) ``label``: for evaluation and simulated experts only. ``imbalance``
    (``{class name or index: fraction kept}``) subsamples those classes in the training split.
    Both are seeded by ``seed`` and leave validation and test untouched. ``test_noise_fractions``:
    the same test split with these shares of noisy images too (``data.test_at[p]``; each image's
    noise is the same realisation in every variant), for evaluating one model at several shares.
    ``test_noises``: those variants again under each of these noise models (``data.test_under[noise][p]``),
    with the very pixels a run trained on that noise is tested on (same seed, same ``sigma``).
    Items carry ``group``, the index of their patient group (no identifier), for grouped statistics.
    ``preprocess``: how raw slices become network inputs (:data:`robustmri.data.preprocessing.PREPROCESSING`),
    before any noise is added; the embedded synthetic slices go through it too, as raw slices.
    """
    _check_options((noise, *test_noises), test_noise_fraction, test_noise_fractions, on_error)
    spatial_size = int(spatial_size)
    dataset_dir = resolve_dataset_dir(dataset_dir)
    raw = _raw_slices(dataset_dir, spatial_size, preprocess, seed, synthetic_patients, class_names, on_error,
                      num_workers)
    indices = _split(raw, split_fractions, imbalance, seed)
    simulate_labels = label_noise != "none"
    noisy_labels, _ = flip_labels(raw.labels[indices["train"]], float(label_noise_rate), len(raw.class_names),
                                  label_noise, np.random.default_rng([seed, 20_011]))
    item = _item_maker(raw, noise, sigma, seed)
    noisy_test = _choose_noisy(indices["test"], test_noise_fraction, seed)
    data = ProtocolData(
        train=[item(i, True, label if simulate_labels else None) for i, label in zip(indices["train"], noisy_labels)],
        val=[item(i, False) for i in indices["val"]],
        test=[item(i, i in noisy_test) for i in indices["test"]],
        class_names=tuple(raw.class_names),
        source=raw.source,
        skipped=raw.skipped,
        settings={"data_kind": "synthetic" if dataset_dir is None else "folder", "seed": int(seed),
                  "split_fractions": [float(f) for f in split_fractions], "spatial_size": spatial_size,
                  "preprocess": preprocess, "noise": noise, "noise_sigma": float(sigma),
                  "test_noise_fraction": float(test_noise_fraction), "label_noise": label_noise,
                  "label_noise_rate": float(label_noise_rate), "imbalance": imbalance,
                  **({"synthetic_patients": int(synthetic_patients)} if dataset_dir is None else {})},
    )
    noisy_at = {float(share): _choose_noisy(indices["test"], float(share), seed) for share in test_noise_fractions}
    for share, noisy in noisy_at.items():
        data.test_at[share] = [item(i, i in noisy) for i in indices["test"]]
    for other in test_noises:
        other_item = _item_maker(raw, other, sigma, seed)
        data.test_under[other] = {share: [other_item(i, i in noisy) for i in indices["test"]]
                                  for share, noisy in noisy_at.items()}
    if simulate_labels:
        data.label_noise = {"kind": label_noise, "requested_rate": float(label_noise_rate),
                            **noisy_label_record(data.train)}
    logger.info("data: %s", data.summary())
    return data


def _check_options(noises, test_noise_fraction: float, test_noise_fractions, on_error: str) -> None:
    """Refuse option values the protocol cannot apply (the training noise and every ``test_noises`` entry),
    before anything is read."""
    for noise in noises:
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
    if not 0.0 <= test_noise_fraction <= 1.0:
        raise ValueError(f"test_noise_fraction must lie in [0, 1], got {test_noise_fraction}")
    for share in test_noise_fractions:
        if not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"test_noise_fractions must lie in [0, 1], got {share}")
    check_on_error(on_error)


@dataclass
class _RawSlices:
    """Every usable slice, preprocessed, before splitting and noise."""

    images: np.ndarray  # [N, size, size]
    labels: np.ndarray
    groups: np.ndarray
    files: list[str]
    class_names: tuple[str, ...]
    skipped: list
    source: str


def _raw_slices(dataset_dir: str | None, spatial_size: int, preprocess: str, seed: int, synthetic_patients: int,
                class_names, on_error: str, num_workers: int) -> _RawSlices:
    """The data set's slices (the embedded synthetic set when ``dataset_dir`` is None), preprocessed."""
    if dataset_dir is None:
        preprocess_fn = preprocessing_by_name(preprocess)
        synthetic = generate_slices(n_patients=synthetic_patients, size=spatial_size, seed=seed)
        # rendered in [0, 1] with min 0 and max 1, so min-max scaling leaves them exactly as they are
        images = np.stack([preprocess_fn(image, spatial_size) for image in synthetic["images"]])
        return _RawSlices(images, synthetic["labels"], synthetic["groups"],
                          [f"synthetic/{i:05d}" for i in range(len(synthetic["labels"]))], tuple(CLASS_NAMES), [],
                          f"embedded synthetic set ({synthetic_patients} pseudo-patients, seed {seed})")
    preprocessing_by_name(preprocess)  # an unknown name fails before the data set is scanned
    catalog = scan_dataset(dataset_dir, class_names, on_error)
    images, kept, skipped = _load_images(catalog.records, spatial_size, on_error, num_workers, preprocess)
    return _RawSlices(images, np.array([r.label for r in kept], dtype=np.int64),
                      np.array([r.group for r in kept], dtype=np.int64), [r.file for r in kept],
                      catalog.class_names, catalog.skipped + skipped, dataset_dir)


def _split(raw: _RawSlices, split_fractions, imbalance: dict | None, seed: int) -> dict[str, np.ndarray]:
    """Indices of each split, by patient group; the training split subsampled by ``imbalance``."""
    indices = grouped_stratified_split(raw.labels, raw.groups, split_fractions, seed)
    keep = parse_imbalance(imbalance, raw.class_names)
    if keep:
        indices["train"] = indices["train"][subsample_classes(raw.labels[indices["train"]], keep, [seed, 20_021])]
    return indices


def _item_maker(raw: _RawSlices, noise: str, sigma: float, seed: int):
    """``item(i, noisy, label=None)``: slice ``i`` as a data item, with its fixed noise when ``noisy``.

    The noise of slice ``i`` is seeded by (seed, i), so it is the same realisation in every split
    variant and for every method trained with this seed.
    """
    rician_field = reference_rician_field(raw.images.shape[1:], seed) if noise == "rician_reference" else None

    def item(i: int, noisy: bool, label: int | None = None) -> dict:
        image = raw.images[i]
        if noisy and noise != "none":
            image = apply_noise(image, noise, sigma, np.random.default_rng([seed, i]), rician_field)
        entry = {"image": image[None].astype(np.float32),
                 "label": int(raw.labels[i]) if label is None else int(label), "id": int(i),
                 "noisy": bool(noisy and noise != "none"), "file": raw.files[i], "group": int(raw.groups[i])}
        if label is not None:
            entry["true_label"] = int(raw.labels[i])
        return entry

    return item


def _choose_noisy(test_indices: np.ndarray, fraction: float, seed: int) -> set[int]:
    rng = np.random.default_rng([seed, 10_007])
    count = int(round(fraction * len(test_indices)))
    return set(rng.permutation(test_indices)[:count].tolist())


#: The last data sets read (key: files, their sizes and times, input size, preprocessing): benchmarks build
#: the protocol once per seed from the same files, and the head preprocessing takes ~20 ms a slice.
_LOADED: dict = {}
#: How many data sets :data:`_LOADED` keeps (one per preprocessing a benchmark compares).
_LOADED_MAX = 2


def _load_images(records, size: int, on_error: str, num_workers: int, preprocess: str = DEFAULT_PREPROCESS):
    """Read and preprocess every record; unreadable ones raise or are skipped (counted)."""
    key = (size, preprocess, tuple((r.file, *_stat(r.file)) for r in records))
    if key in _LOADED:
        return _LOADED[key]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = list(tqdm(pool.map(lambda record: read_preprocessed(record.file, size, preprocess), records),
                            total=len(records), desc="loading images", unit="img", leave=False,
                            disable=len(records) < 200))
    images, kept, skipped = [], [], []
    for record, (image, reason) in zip(records, results):
        if image is None:
            handle_bad_item(record.file, reason, on_error, skipped)
            continue
        images.append(image)
        kept.append(record)
    if not images:
        raise ImageReadError(records[0].file if records else "?", "no image could be read")
    while len(_LOADED) >= _LOADED_MAX:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = (np.stack(images), kept, skipped)
    return _LOADED[key]


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return -1, -1
    return info.st_size, info.st_mtime_ns
