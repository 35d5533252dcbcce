"""`splitserve generate`: offline generation with the engine, printed to stdout."""

from __future__ import annotations

import argparse
import time
from typing import Any

from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="0 or -1: no top-k")
    parser.add_argument(
        "--sampling-seed", type=int, default=None, help="per-request seed (reproducible)"
    )
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")


def chat_prompt_ids(tokenizer: Any, content: str) -> list[int]:
    """One user message through the chat template, as the router renders it: the template's
    text, then its token ids without extra special tokens (apply_chat_template with
    tokenize=True returns a BatchEncoding in transformers 5, a list before)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(text, str):
        raise ValueError(f"the chat template returned {type(text).__name__}, not text")
    return list(tokenizer.encode(text, add_special_tokens=False))


def run(args: argparse.Namespace) -> int:
    from splitserve.engine.llm import LLM
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    llm = LLM.from_config(engine_config_from_args(args))
    prompts: list[str | list[int]] = list(args.prompt)
    if args.chat:
        tok = llm.get_tokenizer()
        prompts = [chat_prompt_ids(tok, p) for p in args.prompt]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = 0
    for prompt, out in zip(args.prompt, outputs, strict=True):
        comp = out.outputs[0]
        num_tokens += len(comp.token_ids)
        print(f"prompt: {prompt!r}\noutput: {comp.text!r} [{comp.finish_reason}]\n")
    print(f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed:.2f} s")
    return 0
