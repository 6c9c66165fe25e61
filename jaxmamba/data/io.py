"""NIfTI reading and writing in nnU-Net's axis order (docs/architecture.md, "Conventions").

Volumes are returned as the NIfTI voxel axes reversed (`z, y, x`, what SimpleITK and nnU-Net's
`NibabelIO` give), with the spacing reversed to match. The affine and the header travel with the
array as a JSON-serialisable `geometry` dict so that a prediction can be written back with the
input's exact geometry (`write_volume`, atomic).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from jaxmamba import jsonfile
from jaxmamba.atomic import atomic_path, write_text
from jaxmamba.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the case and the file."""


def _reverse3(img: nib.spatialimages.SpatialImage, path: Path) -> tuple[int, ...]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1) is a 3-D volume written as 4-D
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {list(img.shape)} "
                        f"({len(img.shape)}-D)")
    return shape


def load_header(path: str | Path) -> tuple[nib.spatialimages.SpatialImage, tuple[int, ...]]:
    """Open a NIfTI file without reading voxels: `(image, 3-D voxel shape (x, y, z))`."""
    path = Path(path)
    try:
        img = nib.load(path)
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise DataError(f"{path}: unreadable NIfTI header ({type(err).__name__}: {err})") from err
    shape = _reverse3(img, path)
    from jaxmamba.data.spacing import spacing_problem
    if problem := spacing_problem(img.header.get_zooms()[:3][::-1]):
        raise DataError(f"{path}: {problem}")
    return img, shape


def load_volume(path: str | Path, *, dtype=np.float32) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one 3-D NIfTI file.

    Returns `(array (z, y, x) of dtype, geometry)`; `geometry` holds `spacing` (z, y, x), `shape`
    (z, y, x), `affine` (4x4 list) and the serialised header (see `geometry_to_image`).
    """
    path = Path(path)
    img, shape = load_header(path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except Exception as err:  # truncated gzip: EOFError, zlib.error, OSError, ValueError
        raise DataError(f"{path}: cannot read voxel data ({type(err).__name__}: {err}); the file "
                        f"is truncated or corrupt") from err
    return np.ascontiguousarray(data.transpose(2, 1, 0)), geometry_of(img, shape)


def geometry_of(img: nib.spatialimages.SpatialImage, shape_xyz: tuple[int, ...]) -> dict[str, Any]:
    """JSON-serialisable geometry of a NIfTI image, in nnU-Net axis order."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return {
        "shape": list(shape_xyz[::-1]),
        "spacing": zooms[::-1],
        "affine": np.asarray(img.affine, dtype=np.float64).tolist(),
        "nifti_class": type(img).__name__,
        "header": base64.b64encode(img.header.binaryblock).decode("ascii"),
    }


def geometry_to_image(data_zyx: np.ndarray, geometry: dict[str, Any]) -> nib.Nifti1Image:
    """A NIfTI image of `data_zyx` (nnU-Net order) with the affine and header of `geometry`."""
    cls = nib.Nifti2Image if geometry.get("nifti_class") == "Nifti2Image" else nib.Nifti1Image
    header = cls.header_class(binaryblock=base64.b64decode(geometry["header"]))
    data = np.asarray(data_zyx).transpose(2, 1, 0)
    header.set_data_dtype(data.dtype)
    img = cls(data, np.asarray(geometry["affine"]), header=header)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def write_volume(path: str | Path, data_zyx: np.ndarray, geometry: dict[str, Any]) -> None:
    """Write `data_zyx` (z, y, x) as NIfTI with the geometry of the source image, atomically.

    The shape must equal `geometry["shape"]`; labels should be passed as an integer array
    (uint8/int16), probabilities as float32.
    """
    path = Path(path)
    if list(data_zyx.shape) != list(geometry["shape"]):
        raise DataError(f"{path}: array shape {list(data_zyx.shape)} does not match the source "
                        f"image shape {geometry['shape']}")
    with atomic_path(path) as tmp:
        nib.save(geometry_to_image(data_zyx, geometry), tmp)


def read_json(path: str | Path) -> Any:
    """`jaxmamba.jsonfile.read_json` with `DataError`s."""
    return jsonfile.read_json(path, DataError)


def strict_json(obj: Any) -> Any:
    """`obj` as strict JSON accepts it: NaN and infinities become null (`json.dumps` would write
    the bare `NaN` / `Infinity` that strict parsers reject), numpy scalars plain numbers, tuples
    lists."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """`np.save` atomically, so a crash never leaves a half-written array under the final name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
