"""Regenerate the checked-in gRPC stubs from k2store/proto/k2.proto and kvtier/proto/blockstore.proto.

    python scripts/gen_proto.py          # rewrite k2store/proto/k2_pb2*.py{,i} and kvtier/proto/blockstore_pb2*.py{,i}
    python scripts/gen_proto.py --check  # exit 1 when the checked-in stubs are stale (CI)

Stubs are checked in so that installing K2 needs no protoc; CI runs --check so they never drift
from the schema. The generator is pinned (grpcio-tools and mypy-protobuf in the dev extra) because
another version writes different bytes.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = [Path("k2store/proto/k2.proto"), Path("kvtier/proto/blockstore.proto")]


def outputs(proto: Path) -> list[str]:
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py", f"{stem}_pb2_grpc.pyi"]


def generate(out_root: Path, proto: Path) -> None:
    from grpc_tools import protoc  # dev extra

    (out_root / proto.parent).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        str(ROOT / proto),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stale = []
        for proto, name in [(p, n) for p in PROTOS for n in outputs(p)]:
            if name == outputs(proto)[0]:
                generate(out, proto)
            fresh = (out / proto.parent / name).read_text()
            target = ROOT / proto.parent / name
            current = target.read_text() if target.exists() else ""
            if fresh != current:
                stale.append(name)
                if ns.check:
                    diff = difflib.unified_diff(
                        current.splitlines(),
                        fresh.splitlines(),
                        str(target),
                        "regenerated",
                        lineterm="",
                    )
                    sys.stdout.write("\n".join(list(diff)[:40]) + "\n")
                else:
                    shutil.copyfile(out / proto.parent / name, target)
        if ns.check and stale:
            print(f"stale generated stubs: {', '.join(stale)}; run: python scripts/gen_proto.py")
            return 1
        print(
            "stubs are current"
            if ns.check
            else f"regenerated: {', '.join(stale) or 'nothing changed'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
