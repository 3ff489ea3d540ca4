"""Small writers of test files in the layouts users have, tiny models and batches for engine tests,
and the bundle as users run it (``python -m monai.bundle`` from ``bundle/`` on a tiny embedded set)."""

import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial.distance import cdist
import torch
from PIL import Image
from torch import nn

from conftest import BUNDLE


def write_figshare_mat(path: Path, image: np.ndarray, label: int, pid: str, with_cjdata: bool = True) -> Path:
    """A MATLAB v7.3 file laid out like the figshare release (column-major, as MATLAB writes)."""
    with h5py.File(path, "w") as handle:
        group = handle.create_group("cjdata" if with_cjdata else "other")
        group["image"] = image.astype(np.int16).T
        group["label"] = np.array([[float(label)]])
        group["PID"] = np.array([[ord(c)] for c in pid], dtype=np.uint16)
        group["tumorMask"] = (image > image.mean()).astype(np.uint8).T
    return path


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


def gradient_image(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.add.outer(np.arange(size), np.arange(size)) * 2.0 + rng.integers(0, 20, (size, size))


def tiny_network() -> nn.Module:
    """A 16-pixel classifier with BatchNorm (so buffers matter) for trainer-level tests."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def tiny_batches(n_batches: int = 4, seed: int = 0) -> list[dict]:
    """Fixed batches of six 4 x 4 images with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(6, 1, 4, 4, generator=g), "label": torch.randint(0, 3, (6,), generator=g)}
            for _ in range(n_batches)]


#: Overrides that make every bundle workflow tiny: 32 x 32 images, 30 synthetic patients, batches of 8.
TINY = ["--spatial_size", "32", "--network_padding", "2", "--synthetic_patients", "30", "--batch_size", "8"]


def bundle(*args, check=True, cwd=BUNDLE):
    """``python -m monai.bundle *args`` (from ``bundle/`` unless ``cwd``), on the embedded set."""
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "BRAIN_TUMOR_DATA": ""})
    if check and result.returncode != 0:
        raise AssertionError(f"monai.bundle {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def output_dirs(folder) -> list[str]:
    """``--ckpt_dir`` and ``--output_dir`` inside ``folder``."""
    return ["--ckpt_dir", str(Path(folder) / "models"), "--output_dir", str(Path(folder) / "eval")]


NOISY = ["--label_noise", "symmetric", "--label_noise_rate", "0.2"]


def run_noisy(tmp_path, method, *extra):
    """``configs/<method>.json`` on the tiny embedded set with 20 % flipped training labels; the eval folder."""
    run_in_process("training", f"configs/{method}.json", *TINY, *NOISY, *output_dirs(tmp_path), *extra)
    assert (tmp_path / "models" / "model.pt").is_file()
    return tmp_path / "eval"


#: With TINY and NOISY, overrides that fit every method's own schedule into a two-epoch run
#: (one set for all methods: ids that a config does not use are ignored).
EVERY_METHOD = ["--influence_epoch", "1", "--pie_epoch", "1", "--audit_epoch", "2", "--alr_rounds", "1",
                "--n2v_steps", "5", "--n2v_patch_size", "16"]


def as_kwargs(args) -> dict:
    """Command-line overrides (``["--id", "value", ...]``) as keyword arguments, values read as fire reads them."""
    def value(text):
        try:
            return ast.literal_eval(str(text))
        except (ValueError, SyntaxError):
            return str(text)
    return {str(key).removeprefix("--"): value(text) for key, text in zip(args[::2], args[1::2])}


def run_in_process(run_id: str, config_file, *args, cwd=BUNDLE) -> None:
    """What ``python -m monai.bundle run <run_id> --config_file <config_file> *args`` does, in this process.

    The same ``monai.bundle.run`` the command calls, without the 8 s of imports a new interpreter pays: for tests that
    check what a config does, while the tests of the command itself run it in a subprocess.
    """
    import monai.bundle

    with contextlib.chdir(cwd):
        files = [str(f) for f in config_file] if isinstance(config_file, (list, tuple)) else str(config_file)
        monai.bundle.run(run_id, config_file=files, logging_file=False,
                         **{"dataset_dir": "", **as_kwargs(args)})


def ellipse_head(shape=(120, 200), centre=(55.0, 125.0), axes=(40.0, 28.0), seed: int = 0):
    """A synthetic "head" off-centre in a non-square slice: ``(image, mask)``.

    A filled ellipse (semi-axes ``axes`` = rows, cols) on a dark noisy background, with a
    bright rim (scalp), a mid-grey inside (brain), a dark inner ellipse (ventricle: the mask
    must fill it) and a bright spot (tumour). ``mask`` is the analytic ellipse.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    radius = np.hypot((rows - centre[0]) / axes[0], (cols - centre[1]) / axes[1])
    mask = radius <= 1.0
    image = 5.0 + rng.normal(0.0, 2.0, shape)
    image[mask] = 100.0 + rng.normal(0.0, 6.0, int(mask.sum()))
    image[(radius > 0.9) & mask] += 90.0
    ventricle = np.hypot((rows - centre[0]) / (0.3 * axes[0]), (cols - centre[1]) / (0.2 * axes[1])) <= 1.0
    image[ventricle] = 20.0 + rng.normal(0.0, 3.0, int(ventricle.sum()))
    tumour = np.hypot(rows - centre[0] - 0.4 * axes[0], cols - centre[1] + 0.3 * axes[1]) <= 5.0
    image[tumour] = 240.0 + rng.normal(0.0, 6.0, int(tumour.sum()))
    return np.clip(image, 0.0, None).astype(np.float32), mask


def axes_ratio(mask) -> float:
    """Rows/cols extent of a filled blob from its second moments (an ellipse's semi-axis ratio)."""
    rows, cols = np.nonzero(mask)
    return float(np.sqrt(rows.var() / cols.var()))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def run_ranks(worker, folder, *args, world_size: int = 2, timeout: float = 120) -> list:
    """Start ``worker(rank, world_size, port, folder, *args)`` in ``world_size`` spawned processes (a gloo group
    on a free port); kill any still alive after ``timeout`` s by PID; every rank must exit 0. Returns the
    ``result{rank}.pt`` each wrote into ``folder``."""
    import signal

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(r, world_size, port, str(folder), *args))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout)
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [torch.load(Path(folder) / f"result{r}.pt", weights_only=False) for r in range(world_size)]


def assert_close(a, b, rtol: float = 1e-5) -> None:
    """``a`` equals ``b`` within ``rtol`` of ``b``'s largest magnitude (as float64)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale) <= rtol, float((a - b).abs().max() / scale)


def kill_at_iteration(workflow, iteration: int) -> None:
    """Make ``workflow``'s trainer SIGKILL its own process when ``iteration`` (1-based, global) completes."""
    workflow.parser["initialize"] = [*workflow.parser["initialize"],
                                     f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED"
                                     f"(once={iteration}), lambda engine: os.kill(os.getpid(), 9))"]


def killed_in_a_child(run, timeout: float = 120) -> int:
    """``run()`` in a forked child (the modules already imported, so no start-up cost); its exit code.
    The child is killed by its PID if it outlives ``timeout``.

    Also the one way tests keep work apart from the test process: fitting an ONNX detector in the test process
    leaves it in a state where a later test's training in a forked child fails ("Unable to handle autograd's
    threading in combination with fork-based multiprocessing"; the cause is not found yet), so tests that export
    a detector for a module fixture do it in a child (:func:`deploy_helpers.exported_apart`)."""
    import multiprocessing
    import signal

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(timeout)
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    return child.exitcode


def write_abstention_state(checkpoint, network: nn.Module, spatial_size: int, preprocess: str = "minmax",
                           patients: int = 30, seed: int = 0):
    """Fit ``network``'s abstention state on a small embedded synthetic set and save it beside ``checkpoint`` (the
    state a checkpoint that training wrote has): for tests whose checkpoint was saved by hand."""
    from robustmri.abstention.fit import fit_state, protocol_arrays
    from robustmri.abstention.state import save_state
    from robustmri.data.protocol import build_protocol

    data = build_protocol(None, spatial_size=spatial_size, synthetic_patients=patients, seed=seed,
                          preprocess=preprocess)
    state = fit_state(network.eval(), *protocol_arrays(data, "train"), protocol_arrays(data, "val")[0], checkpoint)
    return save_state(state, checkpoint)


def train_tiny_bundle(folder, *extra) -> Path:
    """Train ``configs/train.json`` for one epoch on the tiny embedded set (:data:`TINY`) into ``folder``, in process;
    the checkpoint ``folder/models/model.pt`` (with what training writes beside it)."""
    run_in_process("training", "configs/train.json", *TINY, "--epochs", "1", *output_dirs(folder), *extra)
    return Path(folder) / "models" / "model.pt"


def independent_mahalanobis(features, labels, queries, ridge=1e-3):
    """Lee et al.'s score written out with numpy and scipy: pooled covariance, scipy's Mahalanobis distance."""
    classes = sorted(set(labels.tolist()))
    pooled = sum(np.cov(features[labels == c].T, bias=True) * (labels == c).sum() for c in classes) / len(features)
    pooled = pooled + ridge * np.trace(pooled) / len(pooled) * np.eye(len(pooled))
    inverse = np.linalg.pinv(pooled)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    return (cdist(queries, means, metric="mahalanobis", VI=inverse) ** 2).min(1)
