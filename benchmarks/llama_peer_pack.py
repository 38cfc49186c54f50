"""Pack what `llama_peer.py` needs on the GPU machine (which has no package index) into the
git-ignored `.peer/`: llama.cpp's sources, pruned to a CUDA build of `llama-server`, as one
tar.gz, and the wheels of the GGUF writer. Run here, where the package index is reachable:

    python3 benchmarks/llama_peer_pack.py   (a Python with pip: the venv has none)

llama.cpp ships inside the `llama-cpp-python` source distribution (`vendor/llama.cpp`); the
prune keeps ggml's CPU and CUDA backends, the llama library, `common/`, the server and the tools
CMake adds beside it (small), and drops every other ggml backend, the vocab models, docs, tests,
examples, the web UI's sources (the server is built without its UI), the Python converters and
the git history. `.peer/VERSIONS.json` records the versions, the llama.cpp commit and the
SHA-256 of each file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
# The GGUF writer and what `import gguf` imports (its requests import is lazy and unused).
WHEELS = ("gguf==0.19.0", "pyyaml==6.0.4", "tqdm==4.70.1")  # the last two: as in uv.lock

# Relative to vendor/llama.cpp: not needed to configure and build llama-server with CUDA.
PRUNE = (
    ".git", ".github", ".devops", ".gemini", "ci", "docs", "media", "models", "tests",
    "examples", "pocs", "benches", "gguf-py", "conversion", "requirements", "skills",
    "grammars", "app", "vendor/miniaudio/README.md",
    "tools/ui/src", "tools/ui/tests", "tools/ui/static", "tools/ui/package-lock.json",
    "tools/server/tests", "tools/server/bench", "tools/server/README.md",
    "tools/server/README-dev.md",
    *(f"ggml/src/ggml-{b}" for b in ("metal", "vulkan", "sycl", "cann", "opencl", "webgpu",
                                     "hexagon", "openvino", "et", "virtgpu", "zdnn", "zendnn",
                                     "blas", "rpc", "hip", "musa")),
)
PRUNE_GLOBS = ("convert_*.py", "*.md", "flake.nix", "build-xcframework.sh")


def sha256_of(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *argv], check=True)


def fetch_sdist(dest: Path) -> Path:
    """The llama-cpp-python source distribution (downloaded once into `dest`)."""
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not found:
        _pip("download", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dest))
        found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    return found[0]


def llama_cpp_commit(root: Path) -> str:
    """The vendored llama.cpp's commit (the sdist keeps the submodule's git data)."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def prune(root: Path) -> None:
    """Delete what a CUDA build of llama-server does not need (`PRUNE`, `PRUNE_GLOBS`)."""
    for rel in PRUNE:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for pattern in PRUNE_GLOBS:
        for path in root.glob(pattern):  # top level only: READMEs deeper may be read by CMake
            path.unlink()


def pack(sdist: Path, out: Path) -> dict[str, object]:
    """Unpack the sdist, prune its llama.cpp and write `out/llama.cpp.tar.gz`."""
    with tempfile.TemporaryDirectory(prefix="llama-pack-") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        root = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        commit = llama_cpp_commit(root)
        prune(root)
        target = out / "llama.cpp.tar.gz"
        with tarfile.open(target, "w:gz", compresslevel=9) as tar:
            tar.add(root, arcname="llama.cpp")
    return {"file": target.name, "llama_cpp_python": LLAMA_CPP_PYTHON,
            "llama_cpp_commit": commit, "bytes": target.stat().st_size,
            "sha256": sha256_of(target)}


def fetch_wheels(out: Path) -> list[dict[str, object]]:
    """The GGUF writer's wheels for CPython 3.12 on x86-64 Linux into `out/wheels`."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
         "--platform", "any", "-d", str(wheels), *WHEELS)
    return [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(wheels.glob("*.whl"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".peer"))
    p.add_argument("--sdist", type=Path, help="an llama-cpp-python sdist already downloaded")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sdist = args.sdist or fetch_sdist(Path(".cache/llama-peer"))
    versions = {"sources": pack(sdist, args.out), "wheels": fetch_wheels(args.out)}
    (args.out / "VERSIONS.json").write_text(json.dumps(versions, indent=1) + "\n",
                                            encoding="utf-8")
    carried = [args.out / "llama.cpp.tar.gz", *sorted((args.out / "wheels").glob("*.whl")),
               args.out / "VERSIONS.json"]
    total = sum(p.stat().st_size for p in carried)
    print(json.dumps(versions, indent=1))
    print(f"{args.out}: {total / 2**20:.1f} MiB to carry", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
