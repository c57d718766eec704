"""The I/O floor of a merge, as a process of its own (so it pays the same
interpreter + torch start-up as the merges it is compared with).

Reads every tensor of every input with safetensors (each byte is copied out of
the memory map, as a merge must), then writes one output file of the result's
size in 16 MiB blocks and fsyncs it.  Nothing can merge faster than this on the
same machine and page-cache state.

    python benchmarks/io_floor.py --inputs A B C --out-bytes N --out FILE
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def read_all(paths: list[str], device: str = "cpu") -> int:
    """Every byte of every tensor, through safetensors; returns the bytes read."""
    from safetensors import safe_open
    import torch

    total = 0
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if device != "cpu":
                    t = t.to(device)
                total += t.numel() * t.element_size()
                del t
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return total


def write_out(path: str, nbytes: int, block: int = 16 << 20) -> None:
    """A file of ``nbytes`` written in blocks, then fsynced and closed."""
    chunk = os.urandom(1 << 20) * (block >> 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        view = memoryview(chunk)
        while left > 0:
            n = os.write(fd, view[:min(left, block)])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--out-bytes", type=int, required=True)
    ap.add_argument("--device", default="cpu", help="cuda: also move each tensor to the GPU (host->device floor)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    nread = read_all(a.inputs, a.device)
    t1 = time.perf_counter()
    write_out(a.out, a.out_bytes)
    t2 = time.perf_counter()
    print(json.dumps({"read_bytes": nread, "read_s": t1 - t0, "write_s": t2 - t1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
