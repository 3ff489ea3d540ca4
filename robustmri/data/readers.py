"""Readers for single 2-D images: PNG/JPEG/BMP/TIFF, NIfTI, single DICOM files and
the figshare MATLAB v7.3 release.

Every failure raises :class:`ImageReadError` naming the file and the problem, so a
caller can either stop with a clear message or count and report a skip.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import numpy as np

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
CODECS_HINT = "install the dicom-codecs extra: pip install 'robustmri[dicom-codecs]'"
MAT_SUFFIXES = (".mat",)
IMAGE_SUFFIXES = PIL_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES + MAT_SUFFIXES

#: Labels of the figshare release (cjdata/label): 1 meningioma, 2 glioma, 3 pituitary.
FIGSHARE_LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary"}


class ImageReadError(ValueError):
    """An image file could not be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class FigshareSlice:
    """One slice of the figshare release. ``patient_id`` is an identifier: never log it."""

    image: np.ndarray | None
    label_name: str
    patient_id: str
    tumour_mask: np.ndarray | None


def as_path_list(paths) -> list[str]:
    """One path or several (str or os.PathLike) as a list of str: what the input arguments accept."""
    return [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]


def has_image_suffix(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one 2-D image as float32 [H, W], raw intensities (no scaling)."""
    path = os.fspath(path)
    lower = path.lower()
    if not os.path.isfile(path):
        raise ImageReadError(path, "file not found")
    if lower.endswith(PIL_SUFFIXES):
        image = _read_pil(path)
    elif lower.endswith(NIFTI_SUFFIXES):
        image = _read_nifti(path)
    elif lower.endswith(DICOM_SUFFIXES):
        image = _read_dicom(path)
    elif lower.endswith(MAT_SUFFIXES):
        image = read_figshare_mat(path).image
    else:
        raise ImageReadError(path, f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}")
    return check_finite_2d(image, path)


def check_finite_2d(image: np.ndarray, path: str) -> np.ndarray:
    """Squeeze singleton axes and refuse anything that is not a finite 2-D image."""
    image = np.squeeze(np.asarray(image))
    if image.ndim != 2:
        raise ImageReadError(path, f"expected a single 2-D slice, got an array of shape {image.shape}")
    if min(image.shape) < 2:
        raise ImageReadError(path, f"image too small: {image.shape}")
    image = image.astype(np.float32, copy=False)
    bad = ~np.isfinite(image)
    if bad.any():
        raise ImageReadError(path, f"{int(bad.sum())} NaN/Inf pixel(s)")
    return image


def _read_pil(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I", "F"):
                return np.asarray(img, dtype=np.float32)
            return np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(path, f"not a readable image ({err})") from err


def _read_nifti(path: str) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise ImageReadError(path, f"not a readable NIfTI file ({err})") from err


def _read_dicom(path: str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise ImageReadError(path, f"not a readable DICOM file ({first_line(err)})") from err
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data")
    return dicom_pixels(ds, path)


def dicom_pixels(ds, path: str, frame: int | None = None,
                 rescale: tuple[float, float] | None = None) -> np.ndarray:
    """Decode a DICOM data set's pixels to float32 modality values; the one decoder for single files and series.

    Callers check the result with :func:`check_finite_2d` (``read_image`` does for every format).
    ``frame``: the 1-based frame of a multi-frame image to decode (only that frame is decoded; its
    pixel data is read once and stays on ``ds``); None decodes all pixel data. No decoded array is
    cached on ``ds``.

    ``rescale`` (slope, intercept: a frame's Pixel Value Transformation) is applied when given,
    else RescaleSlope/Intercept or the Modality LUT of ``ds``. MONOCHROME1 (low values displayed
    bright) is negated so that, as in the training images, brighter means a larger value;
    min-max normalisation then treats both alike. A compressed transfer syntax without an
    installed decoder is named with the install hint.
    """
    from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        compressed = syntax.is_compressed
    except ValueError:
        raise ImageReadError(path, f"unknown transfer syntax {syntax}") from None
    if compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as err:
            raise ImageReadError(path, f"no decoder exists for transfer syntax {syntax.name} ({syntax})") from err
        if not decoder.is_available:
            raise ImageReadError(path, f"cannot decode {syntax.name} ({syntax}): no decoder installed; {CODECS_HINT} "
                                       f"(pydicom: {'; '.join(decoder.missing_dependencies)})")
    try:
        pixels = pixel_array(ds, index=None if frame is None else frame - 1)
    except Exception as err:  # truncated data, bad lengths, decoder failures
        where = "" if frame is None else f" of frame {frame}"
        raise ImageReadError(path, f"cannot decode pixel data{where} ({safe_detail(err)})") from err
    try:
        if rescale is not None:
            slope, intercept = rescale
            values = pixels * np.float64(slope) + np.float64(intercept)
        else:
            values = apply_modality_lut(pixels, ds)
    except Exception as err:
        raise ImageReadError(path, f"invalid RescaleSlope/RescaleIntercept or Modality LUT ({safe_detail(err)})") from err
    values = np.asarray(values, dtype=np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = -values
    return values


def safe_detail(err: BaseException) -> str:
    """What a report may say about an exception: its class name, the errno's name for an OS error, and its
    message's first line only when that holds no path separator (messages of I/O errors name the file,
    and a folder may be named after the patient)."""
    name = type(err).__name__
    if isinstance(err, OSError):
        code = errno.errorcode.get(err.errno) if err.errno else None
        return f"{name} {code}" if code else name
    text = first_line(err)
    if text == name or "/" in text or "\\" in text or os.sep in text:
        return name
    return f"{name}: {text[:200]}"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line errors that name a file."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_figshare_mat(path: str | os.PathLike, with_pixels: bool = True) -> FigshareSlice:
    """Read one slice of the figshare release (MATLAB v7.3 / HDF5, group ``cjdata``).

    ``with_pixels=False`` reads only the label and patient id (cataloguing a folder).
    """
    import h5py

    path = os.fspath(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ImageReadError(path, f"not a MATLAB v7.3 (HDF5) file ({err})") from err
    with handle:
        if "cjdata" not in handle:
            raise ImageReadError(path, "no 'cjdata' group: not a figshare brain-tumour .mat file")
        group = handle["cjdata"]
        missing = [key for key in ("image", "label") if key not in group]
        if missing:
            raise ImageReadError(path, f"'cjdata' lacks {', '.join(missing)}")
        # MATLAB stores column-major: h5py sees the transpose.
        image = check_finite_2d(np.asarray(group["image"], dtype=np.float32).T, path) if with_pixels else None
        label_code = int(np.asarray(group["label"]).ravel()[0])
        if label_code not in FIGSHARE_LABELS:
            raise ImageReadError(path, f"unknown figshare label {label_code}; expected 1, 2 or 3")
        patient_id = _matlab_string(group["PID"]) if "PID" in group else ""
        mask = np.asarray(group["tumorMask"], dtype=bool).T if with_pixels and "tumorMask" in group else None
    return FigshareSlice(image, FIGSHARE_LABELS[label_code], patient_id, mask)


def _matlab_string(dataset) -> str:
    """MATLAB char arrays are stored as uint16 code points."""
    codes = np.asarray(dataset).ravel()
    return "".join(chr(int(c)) for c in codes if int(c) != 0)
