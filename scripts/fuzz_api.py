"""Fuzz the router's HTTP API with schemathesis against its own openapi.json.

Starts a redis-server, two scripted decode nodes (tests/scripted_decode.py: real gRPC,
deterministic replies) and the router on the tiny model's tokenizer, then runs

    schemathesis run URL/openapi.json --checks not_a_server_error,status_code_conformance,
        content_type_conformance,response_schema_conformance --max-examples N

and writes its output to --out. Exit code: schemathesis's (0: no 5xx, no schema violation).
The schema it gets is the served one with the `model` fields narrowed to the served name
(else nearly every generated request would stop at a 404 before tokenization and routing).

    python scripts/fuzz_api.py --schemathesis "$(command -v schemathesis)" \\
        --max-examples 150 --out docs/results/schemathesis.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx

from splitserve.engine.model.tiny import make_tiny_model
from splitserve.launch.redis_server import RedisServer
from splitserve.router.config import RouterConfig
from splitserve.router.server import RouterServer
from splitserve.router.tokenizer import RouterTokenizer

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def schema_for(url: str, model: str, out: Path) -> Path:
    """The served openapi.json with every `model` field narrowed to `model`."""
    doc = httpx.get(f"{url}/openapi.json").json()
    for schema in doc["components"]["schemas"].values():
        field = schema.get("properties", {}).get("model")
        if field is not None:
            nullable = "model" not in schema.get("required", [])
            field.clear()
            field.update({"enum": [model, None] if nullable else [model]})
    out.write_text(json.dumps(doc))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemathesis", default="schemathesis", help="the schemathesis CLI")
    parser.add_argument("--max-examples", type=int, default=150, help="cases per operation")
    parser.add_argument("--seed", type=int, default=19, help="schemathesis seed")
    parser.add_argument("--out", type=Path, required=True, help="where its output goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The scripted decode node is a test double: it lives beside the tests.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from scripted_decode import ScriptedDecodeNode

    model_dir = Path(tempfile.mkdtemp(prefix="splitserve-fuzz-")) / "tiny"
    make_tiny_model(model_dir, arch="llama", seed=0)
    tokenizer = RouterTokenizer.load(str(model_dir))
    cluster = f"fuzz{uuid.uuid4().hex[:8]}"
    with RedisServer() as redis_server:
        nodes = [
            ScriptedDecodeNode(tokenizer, "tiny").start(redis_server.url, cluster) for _ in range(2)
        ]
        config = RouterConfig(
            redis_url=redis_server.url, tokenizer="unused", model="tiny", cluster=cluster, port=0
        )
        router = RouterServer(config, tokenizer=tokenizer, log_level="error").start_in_thread()
        try:
            schema = schema_for(router.url, "tiny", model_dir.parent / "openapi.json")
            command = [
                args.schemathesis,
                "run",
                str(schema),
                "--url",
                router.url,
                "--checks",
                ",".join(CHECKS),
                "--max-examples",
                str(args.max_examples),
                "--seed",
                str(args.seed),
                "--workers",
                "1",
                "--no-color",
                "--request-timeout",
                "30",
                "--generation-database",
                "none",
            ]
            run = subprocess.run(command, capture_output=True, text=True)
        finally:
            router.stop_thread()
            for node in nodes:
                node.stop()
    shown = ["schemathesis", "run", "openapi.json", *command[3:]]
    header = "$ " + " ".join(shown) + "\n\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + run.stdout + run.stderr)
    print(run.stdout[-3000:], run.stderr[-2000:], sep="\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
