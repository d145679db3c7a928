"""Regenerate the committed gRPC stubs of the coderepair contract.

``python -m coderepair.protocol.codegen PROTO_DIR OUT_DIR`` (what ``make proto`` runs)
compiles every ``*.proto`` under PROTO_DIR with the protoc bundled in grpcio-tools and
writes, per proto file, ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under OUT_DIR,
plus an ``__init__.py`` per generated package (never in the top-level ``coderepair``
directory, which is a PEP 420 namespace shared by five distributions).

The stubs are committed so that installing ``coderepair-protocol`` compiles nothing; a
test regenerates them and fails on any byte difference. For that check to mean
anything the output must depend only on the .proto files and the pinned grpcio-tools
version, so protoc is given relative paths in sorted order, runs in a scratch
directory, and stale generated files are removed from OUT_DIR.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from coderepair.protocol.errors import ProtocolError

# Suffixes protoc writes for one proto file; anything matching them in an output
# package that the current protos do not produce is stale and removed.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

INIT_TEXT = (
    '"""Generated gRPC stubs of the coderepair contract. Do not edit: run `make proto`."""\n'
)


class CodegenError(ProtocolError):
    """The .proto files could not be compiled into stubs."""


def find_protos(proto_dir: Path) -> list[str]:
    """Return the .proto files under ``proto_dir`` as sorted, '/'-separated relative paths.

    Raises CodegenError when the directory is missing, holds no .proto file, or holds
    one at its top level or directly in the ``coderepair`` namespace directory (its
    generated package would need an ``__init__.py`` there, which breaks PEP 420).
    """
    if not proto_dir.is_dir():
        raise CodegenError(
            f"proto directory {proto_dir} does not exist: pass the directory that holds "
            "coderepair/v1/*.proto (protocol/proto in this repository)"
        )
    protos = sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))
    if not protos:
        raise CodegenError(
            f"no .proto files under {proto_dir}: pass the directory that holds "
            "coderepair/v1/*.proto (protocol/proto in this repository)"
        )
    for rel in protos:
        parts = rel.split("/")
        if len(parts) < 3:
            raise CodegenError(
                f"{rel}: proto files must live in a versioned package directory such as "
                "coderepair/v1/, because coderepair/ itself is a PEP 420 namespace"
            )
    return protos


def _protoc_include_dir() -> Path:
    """The well-known .proto files (google/protobuf/*.proto) shipped with grpcio-tools."""
    # Located, not imported: grpcio-tools is a dev-only dependency without type stubs.
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CodegenError(
            "grpcio-tools is not installed in this environment: run `make setup` "
            "(it installs the pinned grpcio-tools from .ci/constraints.txt)"
        )
    return Path(spec.submodule_search_locations[0]) / "_proto"


def _run_protoc(proto_dir: Path, protos: Sequence[str], scratch: Path) -> None:
    """Compile ``protos`` into ``scratch``; raise CodegenError with protoc's message."""
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--proto_path={_protoc_include_dir()}",
        f"--python_out={scratch}",
        f"--pyi_out={scratch}",
        f"--grpc_python_out={scratch}",
        *protos,
    ]
    try:
        result = subprocess.run(args, capture_output=True, text=True, check=False)
    except OSError as exc:  # the interpreter itself could not start
        raise CodegenError(f"could not run protoc through {sys.executable}: {exc}") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        if "No module named grpc_tools" in detail:
            detail += "\n(install the dev tools: `make setup` installs grpcio-tools)"
        raise CodegenError(f"protoc failed on {proto_dir}:\n{detail}")


def _generated_tree(scratch: Path) -> dict[str, bytes]:
    """Map each generated file's '/'-separated path (relative to the output root) to bytes.

    Adds an ``__init__.py`` to every directory holding generated modules: the stubs
    import each other as ``coderepair.v1.x_pb2``, so the directory must be a package.
    """
    files = {
        p.relative_to(scratch).as_posix(): p.read_bytes()
        for p in sorted(scratch.rglob("*"))
        if p.is_file()
    }
    for package in sorted({rel.rsplit("/", 1)[0] for rel in files}):
        files[f"{package}/__init__.py"] = INIT_TEXT.encode()
    return dict(sorted(files.items()))


def render(proto_dir: Path) -> dict[str, bytes]:
    """Compile every .proto under ``proto_dir``; return the stub files it would write.

    Nothing outside a scratch directory is touched, so a failing compile leaves the
    committed stubs as they were.
    """
    protos = find_protos(proto_dir)
    with tempfile.TemporaryDirectory(prefix="coderepair-codegen-") as tmp:
        scratch = Path(tmp)
        _run_protoc(proto_dir.resolve(), protos, scratch)
        return _generated_tree(scratch)


def _is_generated(path: Path) -> bool:
    return path.name == "__init__.py" or path.name.endswith(GENERATED_SUFFIXES)


def write_tree(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    """Write ``files`` under ``out_dir``; remove stale generated files; return changed paths.

    Only generated packages are touched, and in them only files that look generated
    (``__init__.py`` and the protoc suffixes). Unchanged files are not rewritten, so
    their modification times stay put.
    """
    changed: list[Path] = []
    packages = {rel.rsplit("/", 1)[0] for rel in files}
    for package in sorted(packages):
        package_dir = out_dir / package
        if package_dir.is_dir():
            for existing in sorted(package_dir.iterdir()):
                rel = f"{package}/{existing.name}"
                if existing.is_file() and _is_generated(existing) and rel not in files:
                    existing.unlink()
                    changed.append(existing)
    for rel, data in files.items():
        target = out_dir / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        changed.append(target)
    return changed


def generate(proto_dir: Path, out_dir: Path) -> list[Path]:
    """Regenerate the stubs of ``proto_dir`` into ``out_dir``; return the changed paths."""
    return write_tree(render(proto_dir), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m coderepair.protocol.codegen PROTO_DIR OUT_DIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(
            "usage: python -m coderepair.protocol.codegen PROTO_DIR OUT_DIR\n"
            "  e.g. python -m coderepair.protocol.codegen protocol/proto protocol/src",
            file=sys.stderr,
        )
        return 2
    try:
        changed = generate(Path(args[0]), Path(args[1]))
    except CodegenError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"updated {path}")
    if not changed:
        print("stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
