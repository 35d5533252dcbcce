"""Regenerate the gRPC stubs from node.proto, or check that the committed ones are current.

    python -m splitserve.protocol.gen           # rewrite node_pb2.py, node_pb2_grpc.py, .pyi
    python -m splitserve.protocol.gen --check   # exit 1 when they differ from a fresh build

The proto is compiled under its package path (splitserve/protocol/node.proto), so the gRPC
module imports `from splitserve.protocol import node_pb2` and the descriptor pool knows the
file by a name no other package uses.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "node"
PROTO_PACKAGE_PATH = "splitserve/protocol"
GENERATED = (f"{PROTO_NAME}_pb2.py", f"{PROTO_NAME}_pb2_grpc.py", f"{PROTO_NAME}_pb2.pyi")
STALE_MESSAGE = "stale, run make proto"

logger = logging.getLogger(__name__)


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on proto_dir/node.proto, writing the three stub files into out_dir.

    The proto is compiled as `splitserve/protocol/node.proto`, so its descriptor has a
    package-qualified file name and the gRPC module imports `from splitserve.protocol import
    node_pb2` without any rewriting.
    """
    from grpc_tools import protoc

    proto_file = proto_dir / f"{PROTO_NAME}.proto"
    if not proto_file.is_file():
        raise FileNotFoundError(f"{proto_file} not found")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="splitserve-protoc-") as tmp:
        root = Path(tmp)
        src = root / "src" / PROTO_PACKAGE_PATH
        src.mkdir(parents=True)
        shutil.copyfile(proto_file, src / proto_file.name)
        build = root / "build"
        build.mkdir()
        argv = [
            "grpc_tools.protoc",
            f"-I{root / 'src'}",
            f"-I{well_known}",
            f"--python_out={build}",
            f"--pyi_out={build}",
            f"--grpc_python_out={build}",
            f"{PROTO_PACKAGE_PATH}/{proto_file.name}",
        ]
        rc = protoc.main(argv)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {proto_file}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(build / PROTO_PACKAGE_PATH / name, out_dir / name)
    return [out_dir / name for name in GENERATED]


def stale_files(stub_dir: Path = PROTO_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Names of the stub files in stub_dir that differ from a fresh build (or are missing)."""
    with tempfile.TemporaryDirectory(prefix="splitserve-proto-") as tmp:
        fresh = generate(Path(tmp), proto_dir)
        stale = []
        for path in fresh:
            current = stub_dir / path.name
            if not current.is_file() or current.read_bytes() != path.read_bytes():
                stale.append(path.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.protocol.gen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"{', '.join(stale)}: {STALE_MESSAGE}", file=sys.stderr)
            return 1
        print("protocol stubs are current")
        return 0
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
