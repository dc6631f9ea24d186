"""Sample batches in the ADM layout [dhariwal2021adm]: an .npz whose `arr_0` is uint8 [N, H, W, 3] (NHWC),
`arr_1` the class labels int64 [N] of a class-conditional batch; here also `captions` (unicode [N]) for text.

ADM's evaluator and its reference batches (VIRTUAL_imagenet256_labeled.npz) use this layout, so a samples.npz
written here goes into guided-diffusion's evaluations/evaluator.py as it is, and its reference batches come into
evaluation/metrics.py as they are. A reference batch may also hold `mu`, `sigma` (pool_3 statistics) and `mu_s`,
`sigma_s` (spatial statistics), which ADM's evaluator uses instead of recomputing them from `arr_0`.

The writer streams: 50,000 images of 256 px are 9.8 GB, so they go into the archive part by part and never sit in
memory together; the file appears only when complete (core/files.py).
"""

import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from core.files import write_atomic


def write_streamed(path: Path, shape: tuple[int, ...], parts: Iterable[np.ndarray], **small: np.ndarray) -> None:
    """Write `path` (.npz, uncompressed) with `arr_0` of uint8 `shape` filled from `parts` in order (their first
    dimensions summing to shape[0]) and the `small` arrays beside it. ValueError if the parts do not fill it."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as out:
                header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)), fortran_order=False,
                              shape=tuple(shape))
                np.lib.format.write_array_header_2_0(out, header)
                rows = 0
                for part in parts:
                    if part.dtype != np.uint8 or part.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{path}: a part of {part.dtype} {part.shape[1:]} does not fit {shape}")
                    out.write(np.ascontiguousarray(part).tobytes())
                    rows += len(part)
                if rows != shape[0]:
                    raise ValueError(f"{path}: the parts held {rows} images, expected {shape[0]}")
            for name, array in small.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)

    write_atomic(Path(path), write)


def read_npz(path: Path | str, what: str) -> dict[str, np.ndarray]:
    """The arrays of an ADM-layout .npz (no pickles), checked: `arr_0` uint8 NHWC with 3 channels if present, and
    memory-mapped where it is stored uncompressed (as here and in ADM's batches), so 50,000 images need not fit in
    memory. `what` names the flag in messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name != "arr_0"}
            names = data.files
        if "arr_0" in names:
            arrays["arr_0"] = _mapped(path, "arr_0.npy")
            if arrays["arr_0"] is None:
                with np.load(path, allow_pickle=False) as data:
                    arrays["arr_0"] = data["arr_0"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:  # zlib.error: damaged
        raise ValueError(f"{what} {path}: not a readable .npz ({err})") from err  # bytes in a compressed member
    images = arrays.get("arr_0")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise ValueError(f"{what} {path}: arr_0 must be uint8 [N, H, W, 3] (ADM's layout), got {images.dtype} "
                         f"{list(images.shape)}")
    return arrays


def _mapped(path: Path, member: str) -> np.ndarray | None:
    """`member` of the archive as a read-only memory map, or None when it is compressed (then it must be read)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths are at bytes 26..29
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"damaged zip entry {member}")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or dtype.hasobject:
            return None
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
