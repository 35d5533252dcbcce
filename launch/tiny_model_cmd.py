"""`splitserve make-tiny-model DIR --arch ARCH [--seed N]`: write a tiny seeded test model
in Hugging Face format (config, safetensors, generation config, tokenizer)."""

from __future__ import annotations

import argparse

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="DIR", help="directory to write (created if missing)")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="model family")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same bytes")


def run(args: argparse.Namespace) -> int:
    from splitserve.engine.model.tiny import make_tiny_model

    out = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny {args.arch} model (seed {args.seed}) to {out.resolve()}")
    return 0
