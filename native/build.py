"""cffi (API mode, out-of-line) builds of the native code: the hot path
(`raftka.native._raftka`: raftka.c, records.c for the record codec and syncer.c for group-commit fdatasyncs on native threads) and the load generator of `raftka bench` (`raftka.native._loadgen`).

Run by `pip install` through setup.py's cffi_modules; nothing is prebuilt.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def header_cdef(header: str) -> str:
    """A header without its include guard and includes: the cdef cffi needs.

    Each header stays the one declaration of its native API (raftka.h also of
    the batch layout); cffi reads its comments, #define constants and
    prototypes as they are.
    """
    skipped = ("#ifndef RAFTKA_", "#define RAFTKA_", "#endif", "#include")
    return "\n".join(line for line in header.splitlines() if not line.startswith(skipped))


ffibuilder = FFI()
ffibuilder.cdef(header_cdef((HERE / "raftka.h").read_text()))
ffibuilder.cdef(header_cdef((HERE / "records.h").read_text()))
ffibuilder.cdef(header_cdef((HERE / "syncer.h").read_text()))
ffibuilder.set_source(
    "raftka.native._raftka",
    '#include "raftka.h"\n#include "records.h"\n#include "syncer.h"',
    sources=[str(Path("native") / "raftka.c"), str(Path("native") / "records.c"), str(Path("native") / "syncer.c")],
    include_dirs=[str(Path("native"))],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-pthread"],
    extra_link_args=["-pthread"],
)

loadgen_builder = FFI()
loadgen_builder.cdef(header_cdef((HERE / "loadgen.h").read_text()))
loadgen_builder.set_source(
    "raftka.native._loadgen",
    '#include "loadgen.h"',
    sources=[str(Path("native") / "loadgen.c")],
    include_dirs=[str(Path("native"))],
    libraries=["dl"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    loadgen_builder.compile(verbose=True)
