"""Embedded default data set: procedural 2-D T1 contrast-enhanced brain MRI slices.

Why this exists: the library must train, evaluate and be tested end to end without the
user downloading the real brain-tumour data set (Figshare, 3064 T1-CE slices of 233
patients: 708 meningioma, 1426 glioma, 930 pituitary). This generator reproduces the
radiological cues that separate those three classes, so a classifier has a real (but
not trivial) task:

* meningioma - extra-axial, dural based: a round/lentiform, homogeneously and brightly
  enhancing mass whose base lies on the inner table of the skull (convexity or falx),
  sometimes with a "dural tail"; it pushes the brain away (thin CSF cleft) instead of
  infiltrating it.
* glioma - intra-axial, inside one hemisphere away from the skull: a lobulated mass with
  a noisy boundary, usually ring-enhancing around a dark necrotic core, inside a larger
  hypointense oedema zone; some are only weakly enhancing.
* pituitary - midline sellar mass in the lower centre of the head, sometimes growing
  upwards ("snowman" shape).

Every pseudo-patient has one class, one head and one tumour; its 1..4 slices are
neighbouring cross-sections of it, so slices of one patient look alike - which is why
train/validation/test splits must be grouped by patient (the returned ``groups``).

Only numpy is needed; all shapes are built from analytic
signed distances with anti-aliased edges plus smooth random fields made by separable
Gaussian up-sampling of coarse noise, which keeps generation fast and resolution
independent (16..512 px).
"""

from __future__ import annotations

import functools
import operator

import numpy as np

from robustmri import CLASS_NAMES  # label 0, 1, 2

MENINGIOMA, GLIOMA, PITUITARY = 0, 1, 2

# Class frequencies of the real Figshare set, so class imbalance behaves like the real data.
REAL_CLASS_COUNTS = (708, 1426, 930)
CLASS_PROBABILITIES = tuple(count / sum(REAL_CLASS_COUNTS) for count in REAL_CLASS_COUNTS)

_FIELD_EXTENT = 1.25  # coarse-noise lattice covers slightly more than the [-1, 1] image
_COARSE_NODES = 5  # bias field / head outline: a few bumps across the head
_MEDIUM_NODES = 22  # tumour boundary irregularity and heterogeneity, scalp texture
_FINE_NODES = 48  # gyri and sulci (about 1 cm apart in a real head)


def generate_slices(
    n_patients: int = 200,
    size: int = 128,
    seed: int = 0,
    slices_per_patient: tuple[int, int] = (1, 4),
    *,
    return_masks: bool = False,
    tumour_free: bool = False,
) -> dict:
    """Generate the synthetic data set.

    Returns ``{"images": float32 [N, size, size] in [0, 1], "labels": int64 [N],
    "groups": int64 [N]}`` where ``groups`` is the pseudo-patient id (0..n_patients-1),
    to be used for patient-grouped splits. With ``return_masks=True`` the dict also holds
    ``"tumour_masks"`` (bool [N, size, size], the enhancing/necrotic tumour, without
    oedema) and ``"intracranial_masks"`` (bool [N, size, size], inside the inner table of
    the skull), which let tests check the anatomy of each class.

    Patient ``k`` is drawn from its own child generator (``SeedSequence(seed).spawn``
    semantics), so its slices are identical whatever ``n_patients`` is, and the output is
    bit-identical for identical arguments.

    ``tumour_free=True`` renders the same kind of heads with no lesion and no mass effect (and a
    normal pituitary gland): out-of-distribution inputs for a tumour classifier. ``labels`` then
    hold the class each patient was drawn with, which is not in the image; the tumour masks are empty.
    """
    n_patients = _as_int(n_patients, "n_patients")
    size = _as_int(size, "size")
    seed = _as_int(seed, "seed")
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    min_slices, max_slices = _slice_range(slices_per_patient)

    images, labels, groups, tumour_masks, intracranial_masks = [], [], [], [], []
    for patient in range(n_patients):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(patient,)))
        label = int(rng.choice(len(CLASS_NAMES), p=CLASS_PROBABILITIES))
        n_slices = int(rng.integers(min_slices, max_slices + 1))
        patient_images, patient_tumour, patient_intracranial = _render_patient(
            rng, label, n_slices, size, tumour_free=bool(tumour_free)
        )
        images.append(patient_images)
        labels.append(np.full(n_slices, label, dtype=np.int64))
        groups.append(np.full(n_slices, patient, dtype=np.int64))
        if return_masks:
            tumour_masks.append(patient_tumour)
            intracranial_masks.append(patient_intracranial)

    result = {
        "images": np.concatenate(images).astype(np.float32, copy=False),
        "labels": np.concatenate(labels),
        "groups": np.concatenate(groups),
    }
    if return_masks:
        result["tumour_masks"] = np.concatenate(tumour_masks)
        result["intracranial_masks"] = np.concatenate(intracranial_masks)
    return result


# ----------------------------------------------------------------------------- arguments


def _as_int(value, name: str) -> int:
    """Accept Python/numpy integers only: a float size or seed is almost always a bug."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _slice_range(slices_per_patient) -> tuple[int, int]:
    """Validate the (min, max) number of neighbouring slices drawn per patient."""
    try:
        if isinstance(slices_per_patient, (str, bytes)):
            raise TypeError
        pair = tuple(slices_per_patient)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(
            f"slices_per_patient must be a (min, max) pair, got {slices_per_patient!r}"
        )
    low = _as_int(pair[0], "slices_per_patient[0]")
    high = _as_int(pair[1], "slices_per_patient[1]")
    if low < 1 or high < low:
        raise ValueError(
            f"slices_per_patient must satisfy 1 <= min <= max, got ({low}, {high})"
        )
    return low, high


# ----------------------------------------------------------------------------- primitives


@functools.lru_cache(maxsize=32)
def _pixel_centres(size: int) -> np.ndarray:
    """Pixel-centre coordinates in [-1, 1]; the whole geometry is resolution independent."""
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    centres = centres.astype(np.float32)
    centres.flags.writeable = False
    return centres


@functools.lru_cache(maxsize=64)
def _upsampling_matrix(size: int, nodes: int) -> np.ndarray:
    """[size, nodes] Gaussian interpolation weights, rows scaled to unit variance.

    ``U @ noise @ U.T`` turns white noise on a coarse lattice into a smooth, stationary,
    unit-variance random field at any resolution with two tiny matrix products - far
    cheaper than filtering a full-resolution noise image.
    """
    centres = _pixel_centres(size).astype(np.float64)
    lattice = np.linspace(-_FIELD_EXTENT, _FIELD_EXTENT, nodes)
    spacing = lattice[1] - lattice[0]
    weights = np.exp(-0.5 * ((centres[:, None] - lattice[None, :]) / (0.85 * spacing)) ** 2)
    weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return weights


def _smooth_fields(
    rng: np.random.Generator, n_fields: int, nodes: int, size: int, phases: np.ndarray
) -> np.ndarray:
    """[S, n_fields, size, size] unit-variance smooth fields that drift with slice position.

    Each slice mixes two fixed noise lattices with angle ``phases[s]`` (variance stays
    one), so neighbouring slices share most of their texture, like consecutive slices.
    """
    lattices = rng.standard_normal((2, n_fields, nodes, nodes), dtype=np.float32)
    cos_phase = np.cos(phases).astype(np.float32)[:, None, None, None]
    sin_phase = np.sin(phases).astype(np.float32)[:, None, None, None]
    coarse = cos_phase * lattices[0] + sin_phase * lattices[1]  # [S, n, G, G]
    upsample_t = np.ascontiguousarray(_upsampling_matrix(size, nodes).T)  # [G, size]
    # U @ C @ U.T computed as ((C.T @ U.T).T) @ U.T, both products as small matmuls.
    columns_done = _small_matmul(np.ascontiguousarray(coarse.swapaxes(-1, -2)), upsample_t)
    return _small_matmul(np.ascontiguousarray(columns_done.swapaxes(-1, -2)), upsample_t)


_SINGLE_THREAD_MATMUL_WORK = 1 << 17


def _small_matmul(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ right`` (left [..., M, K], right [K, N]) as a batch of small products.

    Why: each product here is tiny, and a multi-threaded BLAS (OpenBLAS goes parallel
    above ~2**18 multiply-adds) spends far more time synchronising its threads than
    computing - 10x slower on a busy 2-core machine. Splitting the rows keeps every
    BLAS call below that size, so it runs on the calling thread; numpy loops over the
    batch in C, so the split costs almost nothing.
    """
    rows, inner = left.shape[-2], left.shape[-1]
    columns = right.shape[-1]
    chunk = max(1, min(rows, _SINGLE_THREAD_MATMUL_WORK // max(1, inner * columns)))
    n_chunks = -(-rows // chunk)
    padded_rows = n_chunks * chunk
    if padded_rows != rows:
        pad = [(0, 0)] * (left.ndim - 2) + [(0, padded_rows - rows), (0, 0)]
        left = np.pad(left, pad)
    stacked = left.reshape(left.shape[:-2] + (n_chunks, chunk, inner)) @ right
    return stacked.reshape(left.shape[:-2] + (padded_rows, columns))[..., :rows, :]


def _inside(signed_distance, width: float):
    """Anti-aliased indicator: 1 well inside (positive distance), 0 well outside."""
    return np.clip(0.5 + signed_distance * (1.0 / width), 0.0, 1.0)


def _paint(image: np.ndarray, weight, value) -> None:
    """Blend ``value`` over ``image`` in place with opacity ``weight`` (a soft mask)."""
    image += weight * (value - image)


def _bump(offset, width: float):
    """Gaussian profile: a soft band around ``offset == 0``."""
    return np.exp(-np.square(offset * (1.0 / width)))


def _thin_line(offset, width: float, min_width: float):
    """Profile of a thin structure (falx, dura, diploe). Below pixel size it gets wider
    but fainter (partial volume) instead of turning into a fat, full-contrast line."""
    drawn_width = max(width, min_width)
    return (width / drawn_width) * _bump(offset, drawn_width)


def _per_slice(values) -> np.ndarray:
    """Per-slice parameters as float32 [S, 1, 1] so they broadcast over the image."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def _angular_radius(cos_t, sin_t, harmonics: list[tuple[int, float, float]]):
    """1 + sum_k amp_k cos(k*theta + phase_k): a lobulated outline around a centre.

    Uses the Chebyshev-like recurrence on (cos, sin) instead of arctan2 + cos, which is
    several times faster on full images.
    """
    radius = np.ones_like(cos_t)
    cos_k, sin_k = cos_t, sin_t
    order = 1
    for k, amplitude, phase in sorted(harmonics):
        while order < k:
            cos_k, sin_k = cos_k * cos_t - sin_k * sin_t, sin_k * cos_t + cos_k * sin_t
            order += 1
        radius += (amplitude * np.cos(phase)) * cos_k - (amplitude * np.sin(phase)) * sin_k
    return radius


# ----------------------------------------------------------------------------- patients


def _render_patient(rng: np.random.Generator, label: int, n_slices: int, size: int, tumour_free: bool = False):
    """Render all slices of one pseudo-patient at once ([S, H, W], vectorised over S); no lesion if ``tumour_free``."""
    pixel = 2.0 / size  # pixel pitch in normalised image units
    edge = 1.2 * pixel  # anti-aliasing width

    # Neighbouring axial slices: positions z_s around the patient's level in the head.
    slice_gap = rng.uniform(0.03, 0.06)
    slice_offsets = (np.arange(n_slices) - (n_slices - 1) / 2.0) * slice_gap
    slice_offsets += rng.uniform(-0.5, 0.5) * slice_gap
    head_level = rng.uniform(-0.25, 0.25)
    depth = _per_slice(head_level + slice_offsets)
    phases = (slice_offsets * rng.uniform(4.0, 7.0)).astype(np.float32)

    # ---- head: ellipse with random size, aspect, small rotation and offset.
    semi_x = rng.uniform(0.75, 0.81)
    semi_y = min(semi_x * rng.uniform(1.08, 1.2), 0.95)
    rotation = np.deg2rad(np.clip(rng.normal(0.0, 4.0), -10.0, 10.0))
    offset_x, offset_y = rng.uniform(-0.03, 0.03, size=2)
    coords = _pixel_centres(size)
    dx = coords[None, None, :] - np.float32(offset_x)
    dy = coords[None, :, None] - np.float32(offset_y)
    cos_r, sin_r = float(np.cos(rotation)), float(np.sin(rotation))
    # Head-aligned but isotropic coordinates (image units): tumours are drawn here.
    x_rot = dx * cos_r + dy * sin_r
    y_rot = dy * cos_r - dx * sin_r
    head_scale = 1.0 - 0.35 * np.square(depth)  # cross-section shrinks off the widest level
    scale_x = semi_x * head_scale
    scale_y = semi_y * head_scale

    r_scalp_inner = rng.uniform(0.90, 0.935)
    r_inner_table = r_scalp_inner - rng.uniform(0.05, 0.08)
    r_brain = r_inner_table - rng.uniform(0.008, 0.02)
    edge_head = edge / semi_x  # anti-aliasing width in head-normalised units

    coarse = _smooth_fields(rng, 2, _COARSE_NODES, size, phases)
    medium = _smooth_fields(rng, 5, _MEDIUM_NODES, size, phases)
    fine = _smooth_fields(rng, 2, _FINE_NODES, size, phases)
    bias_field, outline_field = coarse[:, 0], coarse[:, 1]
    scalp_field, texture_field = medium[:, 0], medium[:, 1]
    boundary_field, boundary_field_2, heterogeneity_field = medium[:, 2], medium[:, 3], medium[:, 4]
    gyral_field, sulcal_field = fine[:, 0], fine[:, 1]

    x_head = x_rot / scale_x
    y_head = y_rot / scale_y
    radius = np.sqrt(np.square(x_head) + np.square(y_head)) * (1.0 + 0.012 * outline_field)

    # ---- tumour geometry first: its mass effect warps the brain drawn below.
    tumour = _tumour_geometry(
        rng, label, slice_offsets, semi_x, scale_x, scale_y, r_inner_table, r_brain
    )
    if tumour_free:
        tumour = {**tumour, "mass_effect": 0.0}
        tumour.pop("sella_floor", None)
    dx_t = x_rot - tumour["centre_x"]
    dy_t = y_rot - tumour["centre_y"]
    distance = np.sqrt(np.square(dx_t) + np.square(dy_t)) + 1e-6
    cos_t, sin_t = dx_t / distance, dy_t / distance
    # Radial push away from the tumour, |push| < distance so the warp never folds over.
    push = tumour["mass_effect"] * distance * np.exp(
        -np.square(distance / (tumour["mass_reach"] * tumour["radius"]))
    )
    x_warp = (x_rot - push * cos_t) / scale_x
    y_warp = (y_rot - push * sin_t) / scale_y
    radius_warp = np.sqrt(np.square(x_warp) + np.square(y_warp))

    # ---- intensities (T1 post contrast: fat bright, bone/CSF/air dark, WM > GM).
    scalp_value = rng.uniform(0.65, 0.95)
    skull_value = rng.uniform(0.03, 0.10)
    diploe_value = rng.uniform(0.12, 0.3)
    csf_value = rng.uniform(0.06, 0.16)
    white_value = rng.uniform(0.50, 0.62)
    grey_value = white_value * rng.uniform(0.72, 0.85)

    head = _inside(1.0 - radius, edge_head)
    image = head * (scalp_value * (1.0 + 0.08 * scalp_field))
    inside_scalp = _inside(r_scalp_inner - radius, edge_head)
    _paint(image, inside_scalp, skull_value)
    diploe_centre = 0.5 * (r_scalp_inner + r_inner_table)
    diploe_width = 0.12 * (r_scalp_inner - r_inner_table)
    diploe = _thin_line(radius - diploe_centre, diploe_width, edge_head)
    _paint(image, inside_scalp * diploe, diploe_value)
    intracranial = _inside(r_inner_table - radius, edge_head)
    _paint(image, intracranial, csf_value)

    # Brain parenchyma: cortex ribbon with gyral fingers, white matter inside, mottling.
    brain = _inside(r_brain - radius_warp, edge_head) * intracranial
    cortical_depth = r_brain - radius_warp
    # Grey matter = a surface ribbon plus a band lining each sulcus (sulci are the zero
    # lines of a smooth field), which gives the folded gyral look.
    cortex_thickness = rng.uniform(0.035, 0.055) * (1.0 + 0.4 * gyral_field)
    sulcus_depth = rng.uniform(0.12, 0.2) * (1.0 + 0.3 * gyral_field)
    within_sulcal_reach = _inside(sulcus_depth - cortical_depth, 0.05)
    sulcal_distance = np.abs(sulcal_field)
    grey_fraction = np.maximum(
        _inside(cortex_thickness - cortical_depth, 2.0 * edge_head),
        _inside(0.55 - sulcal_distance, 0.2) * within_sulcal_reach,
    )
    tissue = white_value + grey_fraction * (grey_value - white_value)
    tissue += 0.015 * texture_field
    _paint(image, brain, tissue)
    sulci = _bump(sulcal_field, 0.15) * _inside(sulcus_depth - 0.03 - cortical_depth, 0.05)
    _paint(image, brain * (0.85 * sulci), csf_value)

    _paint_deep_structures(rng, image, brain, intracranial, x_warp, y_warp, radius,
                           depth, edge_head, r_inner_table, grey_value, csf_value)
    _paint_sella(rng, image, brain, x_warp, y_warp, -1 if tumour_free else label, tumour, white_value, csf_value)

    if tumour_free:
        tumour_mask = np.zeros(image.shape, dtype=bool)
    else:
        tumour_mask = _paint_tumour(
            rng, label, tumour, image, brain, intracranial, radius, r_inner_table, x_head,
            distance, cos_t, sin_t, boundary_field, boundary_field_2, heterogeneity_field,
            edge, edge_head, white_value, csf_value,
        )

    # ---- acquisition: smooth multiplicative bias field, Rician noise, per-image scaling.
    image *= np.exp(rng.uniform(0.08, 0.25) * bias_field)
    noise_level = np.float32(rng.uniform(0.008, 0.04) * scalp_value)
    noise = rng.standard_normal((2,) + image.shape, dtype=np.float32) * noise_level
    image = np.sqrt(np.square(image + noise[0]) + np.square(noise[1]))
    low = image.min(axis=(1, 2), keepdims=True)
    high = image.max(axis=(1, 2), keepdims=True)
    image = (image - low) / np.maximum(high - low, 1e-6)
    gamma = rng.uniform(0.8, 1.25)  # scanner/window differences between patients
    if abs(gamma - 1.0) > 1e-3:
        image = np.power(image, np.float32(gamma))
    image = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
    return image, tumour_mask, intracranial > 0.5


def _cross_section(offset_from_centre, reach: float, smallest: float) -> np.ndarray:
    """Relative radius of a sphere's cross-section at a slice offset, never below
    ``smallest`` so every slice of a patient still shows its tumour."""
    relative = np.clip(1.0 - np.square(offset_from_centre / reach), 0.0, 1.0)
    return np.maximum(np.sqrt(relative), smallest)


def _tumour_geometry(rng, label, slice_offsets, semi_x, scale_x, scale_y, r_inner_table,
                     r_brain) -> dict:
    """Per-slice tumour centre/radius (head-aligned image units) and shape parameters.

    Positions are chosen in head-normalised coordinates (where the inner table is the
    circle ``r_inner_table``) so that class-defining anatomy holds on every slice.
    """
    n_slices = len(slice_offsets)
    spec: dict = {}
    # Cross-section of a roughly spherical tumour through neighbouring slices.
    tumour_depth_centre = rng.uniform(-0.03, 0.03)

    if label == MENINGIOMA:
        radius_head = rng.uniform(0.1, 0.28)
        reach = radius_head * rng.uniform(0.9, 1.3) + 0.08
        radius_s = radius_head * _cross_section(slice_offsets - tumour_depth_centre, reach, 0.55)
        embed = rng.uniform(0.3, 0.75)  # how far the sphere centre sits inside the dura
        if rng.random() < 0.75:  # convexity: anywhere around the skull, mostly frontal
            anterior = -0.5 * np.pi  # image "up"
            angle = rng.vonmises(anterior, 0.8) + slice_offsets * rng.normal(0.0, 0.6)
            centre_r = r_inner_table - embed * radius_s
            centre_xh, centre_yh = centre_r * np.cos(angle), centre_r * np.sin(angle)
            spec["falx_side"] = 0.0
        else:  # falcine / parasagittal: base on the falx, on one side of the midline
            side = rng.choice((-1.0, 1.0))
            centre_xh = side * (1.0 - 0.5 * embed) * radius_s
            # Along the falx in front of / behind the ventricles (none beside them).
            anterior_falx = rng.random() < 0.75
            centre_y0 = rng.uniform(-0.65, -0.3) if anterior_falx else rng.uniform(0.3, 0.55)
            centre_yh = centre_y0 + slice_offsets * rng.normal(0.0, 0.4)
            spec["falx_side"] = side
        spec["harmonics"] = [(k, rng.normal(0.0, 0.03), rng.uniform(0, 2 * np.pi)) for k in (2, 3)]
        spec["mass_effect"] = rng.uniform(0.3, 0.7)
        spec["mass_reach"] = 1.6
    elif label == GLIOMA:
        radius_head = rng.uniform(0.1, 0.25)
        for _attempt in range(64):
            side = rng.choice((-1.0, 1.0))
            centre_x0 = side * rng.uniform(0.12, 0.55)
            centre_y0 = rng.triangular(-0.55, -0.25, 0.5)  # frontal lobes favoured
            clear_of_skull = np.hypot(centre_x0, centre_y0) + 1.45 * radius_head < r_brain - 0.04
            if clear_of_skull and abs(centre_x0) > 0.6 * radius_head:
                break
            radius_head *= 0.97
        reach = radius_head * rng.uniform(0.9, 1.3) + 0.08
        radius_s = radius_head * _cross_section(slice_offsets - tumour_depth_centre, reach, 0.55)
        drift = rng.normal(0.0, 0.25, size=2)
        centre_xh = centre_x0 + slice_offsets * drift[0]
        centre_yh = centre_y0 + slice_offsets * drift[1]
        spec["harmonics"] = [
            (k, rng.uniform(0.04, 0.13) / np.sqrt(k - 1), rng.uniform(0, 2 * np.pi))
            for k in (2, 3, 4, 5, 6)
        ]
        spec["oedema_harmonics"] = [
            (k, rng.uniform(0.05, 0.15), rng.uniform(0, 2 * np.pi)) for k in (2, 3)
        ]
        spec["mass_effect"] = rng.uniform(0.15, 0.5)
        spec["mass_reach"] = 2.0
    else:  # PITUITARY
        radius_head = rng.uniform(0.06, 0.15)
        reach = radius_head * rng.uniform(0.9, 1.3) + 0.06
        radius_s = radius_head * _cross_section(slice_offsets - tumour_depth_centre, reach, 0.67)
        sella_floor = rng.uniform(0.40, 0.52)
        centre_xh = rng.normal(0.0, 0.012) + slice_offsets * rng.normal(0.0, 0.1)
        centre_yh = sella_floor - 0.8 * radius_s
        spec["sella_floor"] = sella_floor
        snowman = rng.random() < 0.35
        spec["upper_lobe"] = (rng.uniform(0.55, 0.85), rng.uniform(0.9, 1.3)) if snowman else None
        spec["harmonics"] = [(2, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi))]
        spec["mass_effect"] = rng.uniform(0.1, 0.3)
        spec["mass_reach"] = 1.5

    centre_xh = np.broadcast_to(centre_xh, (n_slices,))
    centre_yh = np.broadcast_to(centre_yh, (n_slices,))
    spec["centre_x"] = _per_slice(centre_xh) * scale_x
    spec["centre_y"] = _per_slice(centre_yh) * scale_y
    spec["radius"] = _per_slice(radius_s) * scale_x
    # Subtle cases keep the task from being trivial: tumour barely brighter than brain.
    spec["contrast"] = rng.uniform(0.3, 0.55) if rng.random() < 0.15 else rng.uniform(0.8, 1.0)
    return spec


def _paint_deep_structures(rng, image, brain, intracranial, x_warp, y_warp, radius, depth,
                           edge_head, r_inner_table, grey_value, csf_value) -> None:
    """Basal ganglia, lateral ventricles, falx and sagittal sinus (in warped coordinates,
    so a tumour's mass effect bends them)."""
    abs_x = np.abs(x_warp)
    ventricle_scale = rng.uniform(0.7, 1.3) * np.clip(1.0 - 2.5 * np.square(depth), 0.25, 1.0)

    # Deep grey nuclei lateral to the ventricles.
    nuclei_x, nuclei_y = rng.uniform(0.2, 0.26), rng.uniform(-0.02, 0.08)
    nuclei = ((abs_x - nuclei_x) / 0.09) ** 2 + ((y_warp - nuclei_y) / 0.15) ** 2
    _paint(image, brain * (0.6 * _inside(1.0 - nuclei, 0.6)), grey_value * 1.04)

    # Lateral ventricles: bananas bowed towards the midline (frontal and occipital horns
    # pointing laterally), frontal horns a little wider - the axial "butterfly".
    centre_x = rng.uniform(0.06, 0.09) * np.sqrt(ventricle_scale)
    centre_y = rng.uniform(-0.08, 0.0)
    half_width = rng.uniform(0.035, 0.06) * ventricle_scale
    half_length = rng.uniform(0.2, 0.28) * np.sqrt(ventricle_scale)
    tilt, bend = rng.uniform(-0.05, 0.15), rng.uniform(0.8, 1.6)
    along = y_warp - centre_y
    axis_x = centre_x + tilt * along + bend * np.square(along)
    local_width = half_width * np.clip(1.0 - 0.35 * along / half_length, 0.5, None)
    shape = np.square((abs_x - axis_x) / local_width) + np.square(along / half_length)
    ventricle_edge = 2.0 * edge_head / np.maximum(half_width, 1e-3)
    _paint(image, brain * _inside(1.0 - shape, ventricle_edge), csf_value)

    # Interhemispheric fissure with the falx: dark CSF line, thin brighter dura in it,
    # absent at the level of the ventricles / corpus callosum.
    gap = rng.uniform(0.22, 0.35)
    falx_extent = _inside(np.abs(y_warp - centre_y) - gap, 0.06)
    fissure_width = rng.uniform(0.012, 0.02)
    fissure = _thin_line(x_warp, fissure_width, edge_head)
    _paint(image, intracranial * falx_extent * (0.85 * fissure), csf_value)
    dura = _thin_line(x_warp, 0.4 * fissure_width, edge_head)
    _paint(image, intracranial * falx_extent * (0.5 * dura), 0.9 * grey_value)

    # Enhancing superior sagittal sinus at both ends of the falx (a midline, dural,
    # bright confounder for meningioma and pituitary).
    if rng.random() < 0.75:
        sinus = _bump(x_warp, 0.035) * _bump(radius - (r_inner_table - 0.025), 0.025)
        _paint(image, intracranial * (sinus * (np.abs(y_warp) > 0.3)), rng.uniform(0.45, 0.75))


def _paint_sella(rng, image, brain, x_warp, y_warp, label, tumour, white_value,
                 csf_value) -> None:
    """Skull-base context at the sella: dark sphenoid sinus and (non-pituitary classes)
    a small normal gland, so a small pituitary adenoma is not trivially detectable."""
    sella_floor = tumour.get("sella_floor", rng.uniform(0.40, 0.52))
    if rng.random() < 0.6:
        sinus = np.square(x_warp / rng.uniform(0.045, 0.075)) + np.square(
            (y_warp - sella_floor - 0.06) / rng.uniform(0.025, 0.04)
        )
        _paint(image, brain * _inside(1.0 - sinus, 0.4), rng.uniform(0.4, 1.0) * csf_value)
    if label != PITUITARY and rng.random() < 0.6:
        gland = np.square(x_warp / rng.uniform(0.025, 0.045)) + np.square(
            (y_warp - sella_floor + 0.02) / rng.uniform(0.015, 0.025)
        )
        _paint(image, brain * _inside(1.0 - gland, 0.4), white_value * rng.uniform(1.1, 1.35))


def _paint_tumour(rng, label, tumour, image, brain, intracranial, radius, r_inner_table,
                  x_head, distance, cos_t, sin_t, boundary_field, boundary_field_2,
                  heterogeneity_field, edge, edge_head, white_value, csf_value) -> np.ndarray:
    """Paint the class-specific lesion; return the boolean tumour mask [S, H, W]."""
    tumour_radius = tumour["radius"]
    normalised = distance / (tumour_radius * _angular_radius(cos_t, sin_t, tumour["harmonics"]))
    edge_t = edge / tumour_radius  # anti-aliasing width in normalised tumour units
    contrast = tumour["contrast"]

    def with_contrast(value):
        """Pull the lesion intensity towards white matter for the subtle cases."""
        return white_value + contrast * (value - white_value)

    if label == MENINGIOMA:
        # Homogeneous, bright, well circumscribed, clipped by the inner table (flat dural
        # base); a CSF cleft separates it from the compressed brain.
        falcine = tumour["falx_side"] != 0.0
        own_side = _inside(tumour["falx_side"] * x_head, edge_head) if falcine else 1.0
        weight = _inside(1.0 - normalised, edge_t) * intracranial * own_side
        cleft = _bump(normalised - 1.08, 0.07) * brain * own_side
        _paint(image, 0.6 * cleft, csf_value)
        value = with_contrast(rng.uniform(0.8, 1.05)) * (1.0 + 0.03 * heterogeneity_field)
        _paint(image, weight, value)
        if rng.random() < 0.5:  # dural tail: thin enhancing dura tapering away from the base
            tail_length = rng.uniform(0.4, 1.0)
            beyond = normalised - 1.0
            taper = np.clip(1.0 - beyond / tail_length, 0.0, 1.0) * (beyond > 0)
            dura_width = 0.012
            if falcine:
                dura = _thin_line(x_head - tumour["falx_side"] * dura_width, dura_width, edge_head)
            else:
                dura = _thin_line(radius - (r_inner_table - dura_width), dura_width, edge_head)
            _paint(image, intracranial * dura * taper * 0.8, 0.9 * value)
        return weight > 0.5

    if label == GLIOMA:
        # Hypointense vasogenic oedema first, larger and irregular.
        if rng.random() < 0.9:
            oedema_size = rng.uniform(1.5, 2.3)
            oedema_outline = _angular_radius(cos_t, sin_t, tumour["oedema_harmonics"])
            oedema_distance = distance / (tumour_radius * oedema_size * oedema_outline)
            oedema_distance = oedema_distance + 0.2 * boundary_field_2
            oedema = _inside(1.0 - oedema_distance, 0.3) * brain
            image *= 1.0 - rng.uniform(0.2, 0.4) * oedema
        infiltrative = normalised + rng.uniform(0.1, 0.22) * boundary_field
        weight = _inside(1.0 - infiltrative, edge_t) * brain
        if rng.random() < 0.7:  # ring enhancement around central necrosis
            rim = rng.uniform(0.2, 0.45) * (1.0 + 0.35 * heterogeneity_field)
            core = _inside(1.0 - rim - infiltrative, edge_t)
            rim_value = with_contrast(rng.uniform(0.75, 1.0)) * (1.0 + 0.12 * boundary_field_2)
            core_value = rng.uniform(0.12, 0.3) * (1.0 + 0.2 * heterogeneity_field)
            _paint(image, weight, rim_value)
            _paint(image, weight * core, with_contrast(core_value))
        else:  # weakly / patchily enhancing
            value = white_value * rng.uniform(0.8, 1.25) * (1.0 + 0.18 * heterogeneity_field)
            _paint(image, weight, value)
        return weight > 0.5

    # PITUITARY: bright midline sellar mass, optionally a suprasellar "snowman" lobe.
    weight = _inside(1.0 - normalised, edge_t)
    if tumour["upper_lobe"] is not None:
        lobe_size, lobe_rise = tumour["upper_lobe"]
        lobe_radius = lobe_size * tumour_radius
        lobe_x = cos_t * distance
        lobe_y = sin_t * distance + lobe_rise * tumour_radius
        lobe = np.sqrt(np.square(lobe_x) + np.square(lobe_y)) / lobe_radius
        weight = np.maximum(weight, _inside(1.0 - lobe, edge / lobe_radius))
    weight = weight * intracranial
    value = with_contrast(rng.uniform(0.7, 1.0)) * (1.0 + 0.06 * heterogeneity_field)
    _paint(image, weight, value)
    return weight > 0.5
