"""Render throughput on one core, and where the time goes (decode / LUT+window / resize / PNG encode).

Images: a 512×512 CT slice, a 2500×2048 DX, and the same DX stored as JPEG 2000 (lossless).
Run: `make bench-render`. Prints one line per image kind; nothing is asserted.
"""

from __future__ import annotations

import io
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as a render worker has

import numpy as np
from PIL import Image as PILImage
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from integrations.imaging import _grey_to_unit, render
from integrations.sample_pacs import ct_slice, generate_studies


def as_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def samples() -> dict[str, bytes]:
    studies = generate_studies(seed=3, xr_size=2500, ct_size=512, ct_slices=30)
    ct = studies[3].instances[10]
    dx = studies[1].instances[0]  # 2500 × 2125 DX, 12 bits in 16
    j2k = dcmread(io.BytesIO(as_bytes(dx)))
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ct.PixelData = ct_slice(512, 3.0, np.random.default_rng(0)).astype("<u2").tobytes()
    return {"CT 512x512": as_bytes(ct), "DX 2500x2125": as_bytes(dx), "DX J2K lossless": as_bytes(j2k)}


def stages(data: bytes, repeats: int) -> dict[str, float]:
    """Median seconds of each stage, measured one by one on the same input."""
    out: dict[str, list[float]] = {"decode": [], "lut+window": [], "resize": [], "png": [], "total": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        ds = dcmread(io.BytesIO(data))
        arr = ds.pixel_array
        t1 = time.perf_counter()
        unit = _grey_to_unit(ds, arr, str(ds.Modality), [])
        grey = np.round(unit * 255.0).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        t2 = time.perf_counter()
        img = PILImage.fromarray(rgb, mode="RGB")
        scale = 512 / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), PILImage.Resampling.LANCZOS)
        t3 = time.perf_counter()
        img.save(io.BytesIO(), format="PNG", compress_level=6)
        t4 = time.perf_counter()
        render(dcmread(io.BytesIO(data)))
        t5 = time.perf_counter()
        for key, value in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            out[key].append(value)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    print("render on one core (median of 5); shares of the stages measured one by one", flush=True)
    for name, data in samples().items():
        s = stages(data, repeats=5)
        parts = s["decode"] + s["lut+window"] + s["resize"] + s["png"]
        shares = ", ".join(f"{k} {s[k] / parts:.0%}" for k in ("decode", "lut+window", "resize", "png"))
        print(f"{name:16} {1 / s['total']:7.1f} images/s ({s['total'] * 1000:6.1f} ms): {shares}", flush=True)


if __name__ == "__main__":
    main()
