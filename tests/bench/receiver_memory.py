"""Peak memory of `nightread listen`'s receiver while one large instance is pushed to it: nightread's
receive path (streams to disk) side by side with pynetdicom's (holds the instance in memory).

Run: `make bench-receiver`. Each receiver runs in its own process; a pynetdicom storage SCU here
pushes one synthetic multi-frame instance (`--mb`, default 400 MB) and the receiver process's peak
RSS (VmHWM) is read before and after. Prints one line per receiver and, last,
`P5 direct_peak_growth_mb=… pynetdicom_peak_growth_mb=…`. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MultiFrameGrayscaleByteSecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE

from integrations.dimse import quiet_pynetdicom


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def _serve(receiver: str, inbox: str, ready: mp.Queue, stop: mp.Event) -> None:
    from integrations.receiver import StoreReceiver

    with StoreReceiver(inbox=Path(inbox), allowed_aes=["BENCH"], dimse_receiver=receiver) as r:
        ready.put(r.port)
        stop.wait()


def _instance(mb: int) -> Dataset:
    frames = mb  # 1 MB frames
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "OT"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, frames * 1024 * 1024, dtype=np.uint8).tobytes()
    return ds


def measure(receiver: str, ds: Dataset) -> tuple[float, float, float]:
    """(peak RSS before the push, after it, seconds for the push)."""
    inbox = tempfile.mkdtemp(prefix="bench-inbox-")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(receiver, inbox, ready, stop))
    proc.start()
    try:
        port = ready.get(timeout=60)
        before = _peak_rss_mb(proc.pid)
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="NIGHTREAD")
        t0 = time.perf_counter()
        status = assoc.send_c_store(ds)
        seconds = time.perf_counter() - t0
        assoc.release()
        if int(status.Status) != 0:
            raise RuntimeError(f"push refused: 0x{int(status.Status):04X}")
        return before, _peak_rss_mb(proc.pid), seconds
    finally:
        stop.set()
        proc.join(timeout=30)
        shutil.rmtree(inbox, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=400, help="size of the pushed instance's pixel data")
    args = parser.parse_args()
    quiet_pynetdicom()
    ds = _instance(args.mb)
    growth = {}
    for receiver in ("direct", "pynetdicom"):
        before, after, seconds = measure(receiver, ds)
        growth[receiver] = after - before
        print(
            f"{receiver:11} peak RSS {before:7.0f} MB before, {after:7.0f} MB after one {args.mb} MB instance "
            f"(+{after - before:.0f} MB), pushed in {seconds:.2f} s",
            flush=True,
        )
    print(f"P5 direct_peak_growth_mb={growth['direct']:.0f} pynetdicom_peak_growth_mb={growth['pynetdicom']:.0f}")


if __name__ == "__main__":
    main()
