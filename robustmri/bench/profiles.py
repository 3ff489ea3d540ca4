"""What the benchmark can run: its methods and variants, recipes and profiles, and how runs branch.

A method is a registered one (:mod:`robustmri.methods`) or a variant: a registered method with
options changed (:data:`VARIANTS`). A profile (:data:`PROFILES`) fixes the methods, seeds, noises,
recipe and bundle config overrides of one table.
"""

from __future__ import annotations

import json

from robustmri.data.augmentation import FAMILIES
from robustmri.methods import in_family, registry

#: The benchmark's isr and isp are the authors' released forms, whatever the bundle's defaults become.
PINNED = {"isr": {"isr_emphasis": "helpful"},
          "isp": {"isp_direction": "gradient", "isp_step": 0.1, "isp_ratio": 1.0},
          # stability training branches, like ISR and ISP, from the naive prefix of influence_epoch epochs
          "stability": {"stability_start_epoch": "@influence_epoch"}}
#: The authors' LiSSA settings (robustmri.influence.solvers.LissaSolver defaults: effective damping 2.5).
LISSA = {"influence_solver": "lissa", "influence_solver_args": {}}
#: ISP's budgeted form, 2 grey levels per pixel (L-inf), chosen before any run of this benchmark (not tuned).
ISP_LINF = {"isp_budget": 2.0 / 255.0, "isp_norm": "linf"}
#: The site-shift profile's settings, fixed before any run and explicit whatever the bundle's defaults: the
#: preprocessing, and the site-shift augmentation on half of the samples of each epoch
#: (robustmri.data.augmentation's default ranges).
SITE = {"minmax": {"preprocess": "minmax", "augment_site_shift_prob": 0.0},
        "aug": {"preprocess": "minmax", "augment_site_shift_prob": 0.5},
        "head": {"preprocess": "head", "augment_site_shift_prob": 0.0},
        "head_aug": {"preprocess": "head", "augment_site_shift_prob": 0.5},
        "head_landmarks_aug": {"preprocess": "head_landmarks", "augment_site_shift_prob": 0.5}}
#: Variants: a registered method with options changed. Every ISP / ISR variant runs beside a
#: control with the same budget and no influence signal (``*_control``).
VARIANTS = {
    # the authors' ISP as released (0.1 x the raw input gradient, every image) with their solver, so its scale is theirs
    "isp_released": ("isp", {**PINNED["isp"], **LISSA}),
    # the same step with a random direction of the same per-image norm
    "isp_released_control": ("isp", {**PINNED["isp"], **LISSA, "isp_control": True}),
    # ISP with units: every image moved by 2/255 per pixel along the sign of its influence gradient ...
    "isp_linf": ("isp", ISP_LINF),
    # ... against the influence gradient (what does the direction do?) ...
    "isp_linf_harmful": ("isp", {**ISP_LINF, "isp_orientation": "harmful"}),
    # ... and along a random sign (no influence signal)
    "isp_linf_control": ("isp", {**ISP_LINF, "isp_control": True}),
    # test-time noise matching's control: the same K-view averaging with left-right flips only, no noise
    "naive_tta_control": ("naive_tta", {"naive_tta_perturbation": "flip"}),
    # test-time noise matching with BatchNorm normalising by the statistics of the test batch of views
    "naive_tta_bn": ("naive_tta", {"naive_tta_batch_norm": "test_batch"}),
    # ISR's weights, randomly reassigned among the training samples (no influence signal)
    "isr_control": ("isr", {**PINNED["isr"], "isr_control": True}),
    # ISR weighting harmful samples up (the paper's text) instead of helpful ones (the released code)
    "isr_harmful": ("isr", {"isr_emphasis": "harmful"}),
    # ISP with the sign of the input gradient, 2 grey levels per pixel, instead of 0.1 x the raw gradient
    "isp_sign": ("isp", {"isp_direction": "sign", "isp_step": 2.0 / 255.0, "isp_ratio": 1.0}),
    # ISP on the most harmful quarter of the training set only
    "isp_top25": ("isp", {"isp_ratio": 0.25, "isp_selection": "harmful"}),
    # validation set of 10 % of patients instead of the paper's 5 %
    "naive_val10": ("naive", {"split_fractions": [0.70, 0.10, 0.20]}),
    "isp_val10": ("isp", {"split_fractions": [0.70, 0.10, 0.20]}),
    # site shifts: min-max and no site augmentation, the head preprocessing and the site-shift augmentation each
    # alone, and together
    "naive_minmax": ("naive", SITE["minmax"]),
    "isr_minmax": ("isr", {**PINNED["isr"], **SITE["minmax"]}),
    "isp_linf_minmax": ("isp", {**ISP_LINF, **SITE["minmax"]}),
    "naive_head": ("naive", SITE["head"]),
    "naive_aug": ("naive", SITE["aug"]),
    "naive_head_aug": ("naive", SITE["head_aug"]),
    "isr_head_aug": ("isr", {**PINNED["isr"], **SITE["head_aug"]}),
    "isp_linf_head_aug": ("isp", {**ISP_LINF, **SITE["head_aug"]}),
    # levers of the honest shift bench: landmark histogram standardisation in place of the head's two percentiles,
    # and the product's configuration at 128 px (run on its own: about 7 times the pixels of the bench's 48 px)
    "naive_head_landmarks_aug": ("naive", SITE["head_landmarks_aug"]),
    "naive_head_aug_128": ("naive", {**SITE["head_aug"], "spatial_size": 128}),
    "naive_head_aug_64": ("naive", {**SITE["head_aug"], "spatial_size": 64}),
    # ... and broader MR-realistic augmentation: the MR acquisition components on half of the samples as well
    # (the bench's artefact, tissue-contrast and noise shifts are then families this configuration trains on)
    "naive_head_mr_aug": ("naive", {**SITE["head_aug"], "augment_mr_prob": 0.5}),
    # ... and wider framing: zoom up to 1.5 (the default stops at 1.15) and the content moved by up to 15 % of the
    # side, the framing a cut skull gives (designed after the bench's skull_cut collapse: exploratory)
    "naive_head_framing_aug": ("naive", {**SITE["head_aug"], "augment_scale": [0.85, 1.5],
                                         "augment_translation": 0.15}),
    # stability training's consistency term between an image and a random flip of it, no noise (same budget)
    "stability_control": ("stability", {**PINNED["stability"], "stability_perturbation": "flip"}),
    # the denoise front end with a Gaussian blur matched in PSNR gain in place of non-local means
    "denoise_control": ("denoise", {"denoise_filter": "blur"}),
}
#: Leave-one-family-out: the product's configuration trained with the site-shift augmentation minus one family
#: (``augment_exclude``), for the honest shift bench: ``{variant: (the full configuration, the family left out)}``.
LEAVE_OUT = {f"naive_head_aug_minus_{family}": ("naive_head_aug", family) for family in FAMILIES}
#: The honest shift bench's levers, each against the configuration it changes: ``{lever: base}`` (the first, no
#: site augmentation, is the augmentation's own contribution, with the sign turned).
SHIFT_LEVERS = {"naive_head": "naive_head_aug", "naive_head_landmarks_aug": "naive_head_aug",
                "naive_head_mr_aug": "naive_head_aug", "naive_head_framing_aug": "naive_head_aug",
                "naive_head_aug_64": "naive_head_aug", "naive_head_aug_128": "naive_head_aug_64"}
VARIANTS.update({variant: ("naive", {**SITE["head_aug"], "augment_exclude": [family]})
                 for variant, (_, family) in LEAVE_OUT.items()})
#: name -> (bundle config, overrides): every registered method (robustmri.methods), then the variants.
METHODS = {**{name: (method.config_path, PINNED.get(name, {})) for name, method in registry().items()},
           **{name: (registry()[base].config_path, overrides) for name, (base, overrides) in VARIANTS.items()}}
#: What a method writes besides the bundle's standard outputs; kept in its run record.
METHOD_OUTPUTS = tuple(dict.fromkeys(method.summary for method in registry().values() if method.summary))
PAPER_METHODS = in_family("noisy images")
#: Methods that train plainly up to the influence epoch: runs of one seed and noise share that prefix.
PREFIX_BASES = ("naive", "isr", "isp", "naive_tta", "stability")
#: Option prefixes that act only from the influence epoch on (a variant changing only these can branch);
#: ``naive_tta_`` acts at test time only, ``stability_`` from its pinned start epoch.
AFTER_PREFIX_OPTIONS = ("isr_", "isp_", "influence_", "naive_tta_", "stability_")
#: Recipes: bundle overlays merged after the method's config (``recipe`` in a profile).
RECIPES = {"product": [], "paper": ["paper_recipe.json"]}

#: Profiles. ``config`` holds bundle config overrides shared by every run (a ``--key value`` on
#: the command line wins); ``eval_p``: the shares of noisy test images each trained model is
#: evaluated at (evaluation only, no retraining); ``branch``: runs of PREFIX_BASES share their
#: first ``influence_epoch`` epochs (trained once per seed and noise).
PROFILES = {
    "paper": {"seeds": 3, "recipe": "paper", "branch": True, "eval_p": [0.0, 0.5, 1.0],
              "methods": ["naive", "at", "n2v", "isr", "isp_released", "isp_linf", "isp_linf_control"],
              "config": {"spatial_size": 256, "network_padding": 0, "epochs": 40, "influence_epoch": 30}},
    # 100 minutes on 2 cores without fast bf16 (10 to 12 s per epoch at 64 px, 5 seeds x 2 noises) hold one
    # 15-epoch prefix and five 5-epoch branches per seed and noise: naive, ISR and ISP with units, each beside
    # its no-signal control. More methods join the same table later from the same prefixes, e.g.
    # `--methods isp_released,isp_released_control` (the authors' ISP), or as full runs `--methods at,n2v`
    # (they cannot branch: together about as long again as this profile, docs/results.md).
    "cpu": {"seeds": 5, "recipe": "product", "branch": True, "eval_p": [0.0, 0.5, 1.0],
            "methods": ["naive", "isr", "isr_control", "isp_linf", "isp_linf_control"],
            "config": {"spatial_size": 64, "network_padding": 2, "epochs": 20, "influence_epoch": 15,
                       "n2v_steps": 200, "n2v_patch_size": 32}},
    "labels_cpu": {"seeds": 3, "recipe": "product", "methods": in_family("noisy labels"),
                   "noises": ["none"], "label_noise_rates": [0.2, 0.4],
                   "config": {"spatial_size": 48, "network_padding": 2, "epochs": 8, "influence_epoch": 6}},
    # Review orders for the MONAI Label app: the label audit (naive training, then every per-sample score) at
    # three flip rates on labels_cpu's protocol, 5 seeds; robustmri.review.orders ranks the recorded values.
    "review_order_cpu": {"seeds": 5, "recipe": "product", "methods": ["audit"], "noises": ["none"],
                         "label_noise_rates": [0.05, 0.1, 0.2],
                         "config": {"spatial_size": 48, "network_padding": 2, "epochs": 8, "influence_epoch": 6}},
    # Site shifts: every model also evaluated on the validation and test splits re-rendered under each
    # shift of robustmri.data.site_shift (``eval_shifts``: the preprocessings to render them for). Smaller than
    # ``cpu`` (48 px, 12 epochs) so that 8 configurations x 5 seeds fit in about an hour; Gaussian training noise
    # only. The rule fixed before any run: the product takes the naive configuration (preprocessing, augmentation)
    # with the highest validation accuracy averaged over every shift (robustmri.bench.shifts.mean_over_shifts).
    "shift_cpu": {"seeds": 5, "recipe": "product", "branch": True, "eval_p": [0.0, 1.0], "noises": ["gaussian"],
                  "eval_shifts": ["minmax", "head"],
                  "methods": ["naive_minmax", "naive_aug", "isr_minmax", "isp_linf_minmax", "naive_head",
                              "naive_head_aug", "isr_head_aug", "isp_linf_head_aug"],
                  "config": {"spatial_size": 48, "network_padding": 2, "epochs": 12, "influence_epoch": 9}},
    # The honest site-shift bench: every model also evaluated on the validation and test splits re-rendered under
    # each shift of robustmri.data.shift_families (``shift_catalog``), tagged in-range, out-of-range or new family,
    # with the head preprocessing (the product's) and the landmark lever's. Configurations: the product's (head
    # preprocessing and the site-shift augmentation), the same without augmentation, two levers (landmark
    # standardisation; MR-realistic augmentation), and the product minus each augmentation family in turn
    # (LEAVE_OUT), all naive training, nothing branched; shift_cpu's protocol otherwise (48 px, 12 epochs,
    # Gaussian training noise, 5 seeds). Runtime on the 2-core CPU machine alone, estimated from shift_cpu's 49.9
    # min (300 epochs, 80 to 150 s of renderings per seed): 50 runs x 12 epochs = 600 epochs at about 8 s with
    # their evaluations, about 80 min, the renderings for two preprocessings, about 20 min, and the site
    # calibration and abstention scores of 20 runs, about 20 min: about 2 hours; the first measurement will say.
    "shift2_cpu": {"seeds": 5, "recipe": "product", "eval_p": [0.0, 1.0], "noises": ["gaussian"],
                   "eval_shifts": ["head", "head_landmarks"], "shift_catalog": "families",
                   "methods": ["naive_head_aug", "naive_head", "naive_head_landmarks_aug", "naive_head_mr_aug",
                               *LEAVE_OUT],
                   # site calibration (test-time BatchNorm adaptation with the abstention refitted) and every
                   # abstention score under each shift, for the configurations that leave nothing out
                   # (robustmri.bench.shift_measures; about a minute a run)
                   "shift_measures": ["naive_head_aug", "naive_head", "naive_head_landmarks_aug", "naive_head_mr_aug"],
                   # influence_epoch: shift_cpu's, for a method with an influence step added with --methods
                   "config": {"spatial_size": 48, "network_padding": 2, "epochs": 12, "influence_epoch": 9}},
    # the input-size lever: the product's configuration at its own 64 px and at 128 px, each preparing the same
    # renderings (the shifts' sizes and noise levels stated at the bench's 48 px training pixel, so a blur or a
    # noise is the same physical one for both sizes)
    "shift2_size": {"seeds": 5, "recipe": "product", "eval_p": [0.0, 1.0], "noises": ["gaussian"],
                    "eval_shifts": ["head"], "shift_catalog": "families", "shift_render_size": 48,
                    "methods": ["naive_head_aug_64", "naive_head_aug_128"],
                    "config": {"spatial_size": 48, "network_padding": 2, "epochs": 12, "influence_epoch": 9}},
    "smoke": {"seeds": 1, "recipe": "product", "branch": True, "eval_p": [0.0, 1.0],
              "methods": ["naive", "isp", "isp_linf_control"],
              "config": {"spatial_size": 32, "network_padding": 2, "epochs": 2, "influence_epoch": 1, "n2v_steps": 5,
                         "n2v_patch_size": 16, "synthetic_patients": 30, "batch_size": 8}},
}


def branchable(method: str) -> bool:
    """Whether ``method`` trains exactly as naive training (with :func:`prefix_overrides`) up to the influence epoch."""
    base = VARIANTS[method][0] if method in VARIANTS else method
    return base in PREFIX_BASES


def prefix_overrides(method: str) -> dict:
    """The options of ``method`` that act before the influence epoch: its prefix is naive training with them."""
    overrides = VARIANTS[method][1] if method in VARIANTS else {}
    return {key: value for key, value in overrides.items() if not key.startswith(AFTER_PREFIX_OPTIONS)}


def prefix_name(overrides: dict) -> str:
    """``prefix``, or ``prefix+key=value+...`` for a prefix trained with ``overrides`` (its folder's name)."""
    return "+".join(["prefix"] + [f"{key}={json.dumps(value, separators=(',', ':'))}".replace('"', "")
                                  for key, value in sorted(overrides.items())])


#: The splits evaluated under site shifts: validation (for choosing) and test (for reporting).
SHIFT_SPLITS = ("val", "test")
#: Paired comparisons of the site-shift tables: (configuration, against). Each is listed twice, since the records
#: in docs/benchmarks/shift name the min-max configurations naive, isr and isp_linf (then the bundle's defaults).
SHIFT_COMPARISONS = [(new, base) for minmax in ("naive_minmax", "naive") for new, base in [
    ("naive_head", minmax), ("naive_aug", minmax), ("naive_head_aug", minmax), ("naive_head_aug", "naive_head"),
    ({"naive_minmax": "isr_minmax", "naive": "isr"}[minmax], minmax),
    ({"naive_minmax": "isp_linf_minmax", "naive": "isp_linf"}[minmax], minmax),
    ("isr_head_aug", "naive_head_aug"), ("isp_linf_head_aug", "naive_head_aug")]]

SHIFT_COMPARISONS = list(dict.fromkeys(SHIFT_COMPARISONS))

#: What a training recipe sets; recorded with the protocol so that runs of another recipe never share a table.
RECIPE_SETTINGS = ("optimizer#_target_", "learning_rate", "weight_decay", "lr_schedule", "warmup_epochs", "batch_size",
                   "augment_flip_prob", "ema_decay", "preprocess", "augment_site_shift_prob")
#: Recipe settings added after records were first kept, with the value every earlier record was trained with.
LEGACY_RECIPE = {"preprocess": "minmax", "augment_site_shift_prob": 0.0}
#: The training precision of every benchmark run unless ``--precision`` says otherwise. The bundle's ``auto`` decides
#: by the processor (bf16 on a CPU with AVX512-BF16 where it measures faster, fp32 without), so two machines would
#: train one protocol differently; the protocol records the precision, and a folder's runs share it. Runs recorded
#: before the protocol named it trained in fp32 (each record's own ``precision`` says so).
BENCHMARK_PRECISION = "fp32"
