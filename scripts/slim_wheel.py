"""Rewrite a wheel without the members matching a pattern (RECORD rewritten to match), so
that it fits a device call's 64 MiB with the other wheels.

    python3 scripts/slim_wheel.py IN.whl OUT.whl --drop REGEX [--drop REGEX ...]

nixl-cu13 1.5.1 carries its nixl_ep extension built for torch 2.12-2.14 (27 MiB
compressed); the GPU image's torch is 2.11 and splitserve never imports it.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import re
import sys
import zipfile


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def slim(src: str, dst: str, patterns: list[re.Pattern[str]]) -> int:
    """Copy `src` to `dst` without the matching members; returns the bytes dropped."""
    dropped = 0
    rows = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        infos = zin.infolist()
        record = next(i for i in infos if i.filename.endswith(".dist-info/RECORD"))
        for info in infos:
            if any(p.search(info.filename) for p in patterns):
                dropped += info.file_size
                continue
            if info is record or info.filename.endswith("/"):
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            rows.append((info.filename, record_hash(data), str(len(data))))
        rows.append((record.filename, "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        zout.writestr(record, text.getvalue().encode(), compress_type=zipfile.ZIP_DEFLATED)
    return dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--drop", action="append", required=True, help="regex of member paths")
    args = parser.parse_args()
    dropped = slim(args.src, args.dst, [re.compile(p) for p in args.drop])
    if dropped == 0:
        print(f"--drop matched nothing in {args.src}", file=sys.stderr)
        return 1
    print(f"dropped {dropped:,d} bytes: {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
