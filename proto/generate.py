"""Regenerate the committed gRPC code in dspex_nb/_proto/ from proto/.

Usage: python proto/generate.py [OUT_DIR]   (needs grpcio-tools: pip install -e .[dev])

OUT_DIR defaults to the repository root; tests pass a temporary directory and
compare the result with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "dspex_nb/_proto/bridge.proto"
GENERATED = ("bridge_pb2.py", "bridge_pb2.pyi", "bridge_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` and return the generated files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    package_dir = out_dir / Path(PROTO_FILE).parent
    return [package_dir / name for name in GENERATED]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for path in generate(target):
        print(path)
