"""cffi (API mode, out-of-line) build of the native hot path: `native._raftka`.

Run by `pip install` through setup.py's cffi_modules; nothing is prebuilt.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def header_cdef(header: str) -> str:
    """raftka.h without its include guard and includes: the cdef cffi needs.

    The header stays the one declaration of the native API and the batch
    layout; cffi reads its comments, #define constants and prototypes as they are.
    """
    skipped = ("#ifndef RAFTKA_H", "#define RAFTKA_H", "#endif", "#include")
    return "\n".join(line for line in header.splitlines() if not line.startswith(skipped))


ffibuilder = FFI()
ffibuilder.cdef(header_cdef((HERE / "raftka.h").read_text()))
ffibuilder.set_source(
    "native._raftka",
    '#include "raftka.h"',
    sources=[str(Path("native") / "raftka.c")],
    include_dirs=[str(Path("native"))],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
