"""What a JSON schema on every row costs a decode step, for splitserve or for vLLM.

    python -m splitserve.benchmarks.grammar_overhead --engine splitserve --model DIR \
        --load-format dummy --device cuda --dtype bfloat16 --out splitserve.json
    python -m splitserve.benchmarks.grammar_overhead --engine vllm --model DIR --out vllm.json

Both engines get the same work: `--batch` prompts of `--input-len` random token ids (below
`--prompt-id-limit`: the regular ids of a Llama-3-sized vocabulary), sampled at temperature 1
(the engine's seed, no per-request generator),
first with no constraint (ignore_eos), then with `SCHEMA` (an object holding an array of
nested objects, so outputs run for hundreds of tokens). Each phase adds the whole batch at
once and steps the engine (splitserve's `EngineCore.step`, vLLM's `LLMEngine.step`; the
wall time between one step's return and the next). Only steps during which every row is
running and has its first token are kept: the batch is exactly `--batch` in each kept step.
The step time is the median of the kept steps; the overhead is constrained / free - 1.

Point both at the same model directory (config and tokenizer, `--load-format dummy`), so
that the grammar masks cover the same vocabulary. vLLM runs from its own environment
(`../shared/vllm` on the device); nothing of splitserve's engine is imported then.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from splitserve.benchmarks.results_io import provenance, write_result

logger = logging.getLogger(__name__)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {
            "type": "array",
            "minItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "status": {"enum": ["open", "shipped", "returned"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["name", "quantity", "status", "tags"],
            },
        },
    },
    "required": ["title", "items"],
}


@dataclass(frozen=True)
class Phase:
    """One batch's step times: all of them, and those with the full batch decoding."""

    name: str
    step_s: list[float]
    full_batch_step_s: list[float]
    output_tokens: int

    def summary(self) -> dict[str, Any]:
        kept = self.full_batch_step_s
        return {
            "steps": len(self.step_s),
            "full_batch_steps": len(kept),
            "median_step_ms": round(1e3 * statistics.median(kept), 4) if kept else None,
            "mean_step_ms": round(1e3 * statistics.fmean(kept), 4) if kept else None,
            "output_tokens": self.output_tokens,
        }


class StepTracker:
    """Feeds on (request id, new tokens, finished) per step; keeps full-batch step times."""

    def __init__(self, name: str, batch: int) -> None:
        self.name, self.batch = name, batch
        self.tokens: dict[str, int] = {}
        self.finished: set[str] = set()
        self.step_s: list[float] = []
        self.full: list[float] = []

    def record(self, seconds: float, outputs: list[tuple[str, int, bool]]) -> None:
        was_full = self._decoding_all()
        for rid, new_tokens, finished in outputs:
            self.tokens[rid] = self.tokens.get(rid, 0) + new_tokens
            if finished:
                self.finished.add(rid)
        self.step_s.append(seconds)
        # A step counts when every row was decoding before it and still is after it.
        if was_full and self._decoding_all():
            self.full.append(seconds)

    def _decoding_all(self) -> bool:
        return len(self.tokens) == self.batch and not self.finished

    @property
    def done(self) -> bool:
        return len(self.finished) == self.batch

    def phase(self) -> Phase:
        return Phase(self.name, self.step_s, self.full, sum(self.tokens.values()))


def timed_steps(step: Callable[[], list[tuple[str, int, bool]]], tracker: StepTracker) -> Phase:
    """Step until every row has finished, timing each step."""
    last = time.perf_counter()
    while not tracker.done:
        outputs = step()
        now = time.perf_counter()
        tracker.record(now - last, outputs)
        last = now
    return tracker.phase()


def run_phases(
    batch: int,
    add_batch: Callable[[str, bool], None],
    step: Callable[[], list[tuple[str, int, bool]]],
) -> Iterator[Phase]:
    """Warm-up (constrained: compiles the schema), unconstrained, then constrained; each
    phase adds the whole batch (`add_batch(name, constrained)`) and steps it to the end."""
    for name, constrained in (("warmup", True), ("free", False), ("json_schema", True)):
        add_batch(name, constrained)
        yield timed_steps(step, StepTracker(name, batch))


def random_prompts(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed)
    limit, length = args.prompt_id_limit, args.input_len
    return [[rng.randrange(limit) for _ in range(length)] for _ in range(args.batch)]


# splitserve.


def splitserve_phases(args: argparse.Namespace) -> Iterator[Phase]:
    from splitserve.engine.llm import LLM
    from splitserve.engine.sampling_params import GrammarSpec, SamplingParams
    from splitserve.launch.engine_args import engine_config_from_args

    core = LLM.from_config(engine_config_from_args(args)).engine
    schema = GrammarSpec(kind="json", source=json.dumps(SCHEMA))

    def add_batch(name: str, constrained: bool) -> None:
        params = SamplingParams(
            max_tokens=args.output_len,
            temperature=1.0,
            ignore_eos=not constrained,
            grammar=schema if constrained else None,
        )
        for i, prompt in enumerate(random_prompts(args)):
            core.add_request(f"{name}-{i}", prompt, params)

    return run_phases(args.batch, add_batch, _splitserve_step(core))


def _splitserve_step(core: Any) -> Callable[[], list[tuple[str, int, bool]]]:
    def step() -> list[tuple[str, int, bool]]:
        return [(o.request_id, len(o.new_token_ids), o.finished) for o in core.step()]

    return step


# vLLM.


def vllm_phases(args: argparse.Namespace) -> Iterator[Phase]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    engine = LLM(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        enable_prefix_caching=False,
        seed=args.seed,
        max_num_seqs=max(args.batch, 256),
        attention_config={"backend": "FLASH_ATTN"},  # as ../shared/vllm's runs
    ).llm_engine
    schema = StructuredOutputsParams(json=SCHEMA)

    def add_batch(name: str, constrained: bool) -> None:
        params = SamplingParams(
            max_tokens=args.output_len,
            temperature=1.0,
            ignore_eos=not constrained,
            structured_outputs=schema if constrained else None,
        )
        for i, prompt in enumerate(random_prompts(args)):
            engine.add_request(f"{name}-{i}", TokensPrompt(prompt_token_ids=prompt), params)

    return run_phases(args.batch, add_batch, _vllm_step(engine))


def _vllm_step(engine: Any) -> Callable[[], list[tuple[str, int, bool]]]:
    seen: dict[str, int] = {}

    def step() -> list[tuple[str, int, bool]]:
        out = []
        for o in engine.step():
            total = len(o.outputs[0].token_ids)  # cumulative in vLLM's outputs
            out.append((o.request_id, total - seen.get(o.request_id, 0), o.finished))
            seen[o.request_id] = total
        return out

    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("splitserve", "vllm"), required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--prompt-id-limit",
        type=int,
        default=128_000,
        help="prompt ids are drawn below this (128,000: Llama 3's regular ids)",
    )
    parser.add_argument("--out", default=None, help="write the result JSON here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.engine == "splitserve":
        from splitserve.launch.engine_args import add_engine_arguments

        add_engine_arguments(parser)
        return parser.parse_args(argv)
    vllm_args = argparse.ArgumentParser(
        parents=[parser], add_help=False, conflict_handler="resolve"
    )
    vllm_args.add_argument("--model", required=True, help="model directory (config, tokenizer)")
    vllm_args.add_argument("--dtype", default="bfloat16")
    vllm_args.add_argument("--seed", type=int, default=0)
    vllm_args.add_argument("--device", default="cuda")
    return vllm_args.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    run = splitserve_phases if args.engine == "splitserve" else vllm_phases
    phases = {p.name: p.summary() for p in run(args)}
    free, constrained = phases["free"]["median_step_ms"], phases["json_schema"]["median_step_ms"]
    overhead = None if not (free and constrained) else round(constrained / free - 1, 4)
    result = {
        **provenance(args.device),
        "engine": args.engine,
        "batch": args.batch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "schema": SCHEMA,
        "phases": phases,
        "step_overhead": overhead,
    }
    if args.engine == "vllm":
        import vllm

        result["vllm"] = vllm.__version__
    logger.info(
        "%s: free %s ms, json_schema %s ms a step: overhead %s",
        args.engine,
        free,
        constrained,
        overhead,
    )
    print(json.dumps({k: result[k] for k in ("engine", "phases", "step_overhead")}))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
