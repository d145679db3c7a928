"""Tests for coderepair.protocol.codegen: the committed stubs are what the protos generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from coderepair.protocol import codegen
from coderepair.protocol.codegen import CodegenError

REPO = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO / "protocol" / "proto"
STUB_DIR = REPO / "protocol" / "src" / "coderepair" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    codegen.generate(PROTO_DIR, tmp_path)
    fresh_dir = tmp_path / "coderepair" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir()}
    committed = {
        p.name: p.read_bytes() for p in STUB_DIR.iterdir() if p.is_file() and p.suffix != ".pyc"
    }
    assert sorted(committed) == sorted(fresh), (
        "the committed stub files differ from what protocol/proto generates: run `make proto`"
    )
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"committed stubs are stale ({', '.join(stale)}): run `make proto`"


def test_generation_is_deterministic() -> None:
    assert codegen.render(PROTO_DIR) == codegen.render(PROTO_DIR)


def test_init_is_written_in_the_versioned_package_only(tmp_path: Path) -> None:
    codegen.generate(PROTO_DIR, tmp_path)
    assert (tmp_path / "coderepair" / "v1" / "__init__.py").is_file()
    # coderepair/ is a PEP 420 namespace shared by five distributions.
    assert not (tmp_path / "coderepair" / "__init__.py").exists()


def test_stale_stubs_are_removed_and_other_files_kept(tmp_path: Path) -> None:
    package = tmp_path / "coderepair" / "v1"
    package.mkdir(parents=True)
    (package / "removed_pb2.py").write_text("# from a proto that no longer exists\n")
    (package / "removed_pb2_grpc.py").write_text("\n")
    (package / "notes.txt").write_text("not generated\n")

    changed = codegen.generate(PROTO_DIR, tmp_path)

    assert package / "removed_pb2.py" in changed
    assert not (package / "removed_pb2.py").exists()
    assert not (package / "removed_pb2_grpc.py").exists()
    assert (package / "notes.txt").read_text() == "not generated\n"
    assert (package / "worker_pb2.py").is_file()
    assert codegen.generate(PROTO_DIR, tmp_path) == [], "a second run must change nothing"


def test_a_broken_proto_reports_protoc_and_writes_nothing(tmp_path: Path) -> None:
    proto = tmp_path / "proto" / "coderepair" / "v1" / "broken.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text('syntax = "proto3";\npackage coderepair.v1;\nmessage Broken { int32 = 1; }\n')
    out = tmp_path / "out"

    with pytest.raises(CodegenError, match=r"broken\.proto"):
        codegen.generate(tmp_path / "proto", out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (None, "does not exist"),
        ([], "no .proto files"),
        (["coderepair/top.proto"], "versioned package directory"),
        (["top.proto"], "versioned package directory"),
    ],
)
def test_unusable_proto_dirs_are_refused_with_a_reason(
    tmp_path: Path, layout: list[str] | None, message: str
) -> None:
    proto_dir = tmp_path / "proto"
    if layout is not None:
        proto_dir.mkdir()
        for rel in layout:
            (proto_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (proto_dir / rel).write_text('syntax = "proto3";\n')
    with pytest.raises(CodegenError, match=message):
        codegen.generate(proto_dir, tmp_path / "out")


def test_command_line_usage_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert codegen.main([]) == 2
    assert "usage:" in capsys.readouterr().err
    assert codegen.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_module_runs_as_make_proto_calls_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "coderepair.protocol.codegen", str(PROTO_DIR), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "coderepair" / "v1" / "trainer_pb2_grpc.py").is_file()


def _descriptor_set_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "contract.pb"
    protos = codegen.find_protos(PROTO_DIR)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    documented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments}
    # Source paths use the field numbers of descriptor.proto: FileDescriptorProto
    # message_type = 4, enum_type = 5, service = 6; field / value / method = 2 inside.
    elements: list[tuple[tuple[int, ...], str]] = []
    for i, message in enumerate(file.message_type):
        elements.append(((4, i), message.name))
        elements += [
            ((4, i, 2, j), f"{message.name}.{f.name}") for j, f in enumerate(message.field)
        ]
    for i, enum in enumerate(file.enum_type):
        elements.append(((5, i), enum.name))
        elements += [((5, i, 2, j), f"{enum.name}.{v.name}") for j, v in enumerate(enum.value)]
    for i, service in enumerate(file.service):
        elements.append(((6, i), service.name))
        elements += [
            ((6, i, 2, j), f"{service.name}.{m.name}") for j, m in enumerate(service.method)
        ]
    return [f"{file.name}: {name}" for path, name in elements if path not in documented]


def test_every_proto_element_is_documented(tmp_path: Path) -> None:
    """The .proto files are the contract's reference: every service, rpc, message,
    field, enum and enum value carries a leading comment (units, who sets it, limits)."""
    descriptor_set = _descriptor_set_with_comments(tmp_path)
    assert len(descriptor_set.file) == 4
    undocumented = [name for file in descriptor_set.file for name in _undocumented(file)]
    assert not undocumented, "undocumented proto elements:\n" + "\n".join(undocumented)
