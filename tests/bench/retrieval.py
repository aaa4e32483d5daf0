"""Retrieval throughput from Orthanc: nightread's C-GET, C-MOVE and WADO-RS side by side with dcmtk's getscu.

Run: `make bench-retrieval` (starts Orthanc on free loopback ports, seeds it, measures, stops it).
Prints one table and, last, `P4 best_vs_getscu=<ratio> cget_vs_getscu=<ratio>` (ratios of MB/s
measured in this same run; > 1 means faster than getscu). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from integrations.dicomweb import DicomWebStudySource
from integrations.pacs import DimseStudySource
from tests.services import Orthanc


def _ds(
    sop_class: str, modality: str, study: str, series: str, rows: int, cols: int, rng: np.random.Generator
) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = "BENCH", "BENCH^SYNTHETIC"
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.Modality = modality
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def seed(orthanc: Orthanc, *, ct_slices: int, dx_images: int) -> dict[str, tuple[str, int, int]]:
    """{name: (study uid, instances, bytes)}"""
    rng = np.random.default_rng(0)
    out = {}
    for name, sop, modality, n, rows, cols in (
        ("CT 512x512", CTImageStorage, "CT", ct_slices, 512, 512),
        ("DX 2500x2048", DigitalXRayImageStorageForPresentation, "DX", dx_images, 2500, 2048),
    ):
        study, series = generate_uid(), generate_uid()
        total = 0
        for _ in range(n):
            data = _ds(sop, modality, study, series, rows, cols, rng)
            total += len(data)
            orthanc.upload(data)
        out[name] = (study, n, total)
    return out


def getscu(orthanc: Orthanc, study: str, dest: Path, *, max_pdu: int = 16384) -> None:
    """dcmtk's getscu; its default largest PDU is 16 KB (nightread's receiver offers 1 MB)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(
        [
            "getscu",
            "--max-pdu",
            str(max_pdu),
            "-aet",
            "GETSCU",
            "-aec",
            orthanc.aet,
            "127.0.0.1",
            str(orthanc.dicom_port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "-od",
            str(dest),
        ],
        check=True,
        capture_output=True,
        env=env,
    )


def moved(source: DimseStudySource, study: str, dest: Path) -> None:
    """A C-MOVE, then our storage SCP stopped: the two C-MOVE routes take turns on the one port Orthanc
    sends to (starting the SCP is inside the measured time for both)."""
    source.retrieve_study(study, dest=dest)
    source.close()


def measure(fn: Callable[[Path], None], *, repeats: int) -> float:
    """Median seconds over `repeats` runs, each into an empty folder."""
    times = []
    for _ in range(repeats):
        dest = Path(tempfile.mkdtemp(prefix="bench-"))
        try:
            t0 = time.perf_counter()
            fn(dest)
            times.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ct-slices", type=int, default=60)
    parser.add_argument("--dx-images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("getscu") is None:
        sys.exit("getscu not found: apt-get install dcmtk")
    folder = Path(tempfile.mkdtemp(prefix="bench-orthanc-"))
    orthanc = Orthanc.on_free_ports(folder)
    orthanc.start()
    try:
        datasets = seed(orthanc, ct_slices=args.ct_slices, dx_images=args.dx_images)
        dimse = dict(host="127.0.0.1", port=orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="NIGHTREAD")
        with (
            DimseStudySource(name="get", retrieve="get", **dimse) as get_src,
            DimseStudySource(name="get2", retrieve="get", parallel=2, **dimse) as get2_src,
            DimseStudySource(name="getp", retrieve="get", dimse_receiver="pynetdicom", **dimse) as getp_src,
            DimseStudySource(name="move", retrieve="move", move_port=orthanc.nightread_port, **dimse) as move_src,
            DimseStudySource(
                name="movep", retrieve="move", move_port=orthanc.nightread_port, dimse_receiver="pynetdicom", **dimse
            ) as movep_src,
            DicomWebStudySource(name="web", url=f"{orthanc.url}/dicom-web") as web_src,
        ):
            routes: dict[str, Callable[[str, Path], None]] = {
                "getscu (dcmtk)": lambda study, d: getscu(orthanc, study, d),
                "getscu --max-pdu 128K": lambda study, d: getscu(orthanc, study, d, max_pdu=131072),
                "nightread C-GET": lambda study, d: get_src.retrieve_study(study, dest=d),
                "nightread C-GET x2": lambda study, d: get2_src.retrieve_study(study, dest=d),
                "nightread C-MOVE": lambda study, d: moved(move_src, study, d),
                "nightread WADO-RS": lambda study, d: web_src.retrieve_study(study, dest=d),
                # the same routes with pynetdicom's own receiver (NIGHTREAD_PACS__DIMSE_RECEIVER=pynetdicom)
                "C-GET, pynetdicom": lambda study, d: getp_src.retrieve_study(study, dest=d),
                "C-MOVE, pynetdicom": lambda study, d: moved(movep_src, study, d),
            }
            results: dict[str, dict[str, float]] = {}
            for name, (study, n, size) in datasets.items():
                for route, fn in routes.items():
                    fn(study, Path(tempfile.mkdtemp(prefix="warm-")))  # warm-up (Orthanc's cache, imports)
                    seconds = measure(lambda d, fn=fn, study=study: fn(study, d), repeats=args.repeats)
                    results.setdefault(route, {})[name] = seconds
                    print(
                        f"{name:14} {route:22} {seconds:7.3f} s  {size / 1e6 / seconds:8.1f} MB/s  "
                        f"{n / seconds:7.1f} images/s",
                        flush=True,
                    )
        total_mb = sum(size for _, _, size in datasets.values()) / 1e6
        mbps = {route: total_mb / sum(r.values()) for route, r in results.items()}
        print()
        print(f"{'route':22} {'MB/s (all data)':>16} {'vs getscu':>10}")
        for route, value in mbps.items():
            print(f"{route:22} {value:16.1f} {value / mbps['getscu (dcmtk)']:10.2f}")
        base = mbps["getscu (dcmtk)"]
        best = max(v for k, v in mbps.items() if k.startswith("nightread"))
        cget = max(v for k, v in mbps.items() if k.startswith("nightread C-GET"))
        big = mbps["getscu --max-pdu 128K"]
        print(f"(against getscu with its largest PDU: best {best / big:.2f}, C-GET {cget / big:.2f})")
        print(f"P4 best_vs_getscu={best / base:.2f} cget_vs_getscu={cget / base:.2f}")
    finally:
        orthanc.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
