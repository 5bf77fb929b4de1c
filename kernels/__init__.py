"""Device code of fastequiv, shipped in the wheel as ``fastequiv.kernels``.

The top-level ``kernels/`` folder of the repository: Triton kernels (``*.py``), CUDA
kernels (``*.cu``) and the host-device math they share with the C++ CPU code in
``csrc/`` (``*.cuh``: Philox-4x32-10 and Shoemake rotations). The CUDA files are
compiled by nvcc into ``fastequiv._C`` and, for the CuPy backend, by NVRTC at run time
from the copies installed here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Folder holding the ``*.cu`` and ``*.cuh`` sources (the include path for NVRTC).
SOURCE_DIR = Path(__file__).resolve().parent


def cuda_source(name: str) -> str:
    """Text of the CUDA source ``name`` (e.g. ``"random_rotations.cu"``) in this folder."""
    path = SOURCE_DIR / name
    if path.suffix not in (".cu", ".cuh") or not path.is_file():
        have = sorted(p.name for p in SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cuh"))
        raise FileNotFoundError(f"name: no CUDA source {name!r} in {SOURCE_DIR} (have {have})")
    return path.read_text()


def nvrtc_source(name: str) -> str:
    """The text NVRTC compiles for ``name``: :func:`cuda_source` plus a last comment line
    holding a hash of every header (``*.cuh``) in this folder.

    CuPy keys its on-disk cache of compiled modules on the source text (and the options),
    not on the headers it includes: without the hash, an edited ``.cuh`` would reuse the
    binary compiled from the old one."""
    digest = hashlib.sha256()
    for header in sorted(SOURCE_DIR.glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return cuda_source(name) + f"\n// fastequiv headers: sha256 {digest.hexdigest()}\n"
