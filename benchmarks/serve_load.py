"""Load test of a running server: Poisson arrivals, WikiText prompts, streaming completions.

    neuron-llm serve --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rate 2 --num-requests 64 \\
        --json serve_load.json --markdown serve_load.md

Requests arrive as a Poisson process of ``--rate`` requests per second (exponential gaps,
seeded), each a streaming ``/v1/completions`` request. Prompt and output lengths are drawn
from the WikiText-2 test split (read from ../shared/data, never copied): a request's prompt
is a random paragraph, cut to ``--max-prompt-words`` words, and its output length is the
word count of the paragraph after it, clipped to [``--min-output-tokens``,
``--max-output-tokens``]; EOS is ignored so that every request generates exactly that many.

Reported: request and token throughput, time to first token (TTFT), inter-token latency
(ITL: gaps between streamed chunks), time per output token (TPOT) and end-to-end latency at
p50/p99, and errors by kind. Only a server on this machine (loopback) is a target.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import platform
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw-test.txt"


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    max_tokens: int


@dataclass
class RequestResult:
    """What one request measured; ``error`` is set when it failed."""

    start: float
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def wikitext_requests(path: Path, count: int, seed: int, args: argparse.Namespace) -> list[RequestSpec]:
    """``count`` requests: a random paragraph as the prompt, the next one's length as the output's."""
    paragraphs = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("=")
    ]
    if len(paragraphs) < 2:
        raise SystemExit(f"{path}: fewer than two paragraphs of text")
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        index = rng.randrange(len(paragraphs) - 1)
        prompt = " ".join(paragraphs[index].split()[: args.max_prompt_words])
        output_words = len(paragraphs[index + 1].split())
        specs.append(RequestSpec(prompt, min(max(output_words, args.min_output_tokens), args.max_output_tokens)))
    return specs


async def send(client: httpx.AsyncClient, model: str, spec: RequestSpec) -> RequestResult:
    """One streaming completion, timed chunk by chunk."""
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                _take_event(result, json.loads(line.removeprefix("data: ")), time.perf_counter())
    except httpx.HTTPError as e:
        result.error = type(e).__name__
    result.end = time.perf_counter()
    if result.error is None and result.first_token is None:
        result.error = "no tokens"
    return result


def _take_event(result: RequestResult, event: dict[str, Any], now: float) -> None:
    if "error" in event:
        result.error = f"stream error: {event['error'].get('code') or event['error'].get('type')}"
        return
    if event.get("usage"):
        result.prompt_tokens = event["usage"]["prompt_tokens"]
        result.output_tokens = event["usage"]["completion_tokens"]
    if any(choice.get("text") for choice in event.get("choices", [])):
        if result.first_token is None:
            result.first_token = now
        result.chunk_times.append(now)


async def run(args: argparse.Namespace, specs: list[RequestSpec]) -> tuple[list[RequestResult], float, str]:
    """Send ``specs`` at Poisson arrival times; returns the results, the wall time and the model name."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        models = (await client.get("/v1/models")).raise_for_status().json()["data"]
        model = models[0]["id"]
        rng = random.Random(args.seed + 1)
        tasks = []
        start = time.perf_counter()
        arrival = start
        for index, spec in enumerate(specs):
            if index:
                # On a schedule from the start, so that time spent sending does not lower the rate.
                arrival += rng.expovariate(args.rate)
                await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(send(client, model, spec)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start, model


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    array = np.asarray(values) * 1000.0  # milliseconds
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99))}


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and errors of a run."""
    done = [r for r in results if r.error is None]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    itls = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpots = [
        (r.chunk_times[-1] - r.first_token) / (r.output_tokens - 1)
        for r in done
        if r.first_token is not None and r.output_tokens > 1
    ]
    return {
        "num_requests": len(results),
        "num_completed": len(done),
        "errors": dict(Counter(r.error for r in results if r.error is not None)),
        "duration_s": duration_s,
        "request_throughput_per_s": len(done) / duration_s,
        "output_token_throughput_per_s": output_tokens / duration_s,
        "total_token_throughput_per_s": (prompt_tokens + output_tokens) / duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "ttft_ms": _percentiles([r.first_token - r.start for r in done if r.first_token is not None]),
        "itl_ms": _percentiles(itls),
        "tpot_ms": _percentiles(tpots),
        "e2e_latency_ms": _percentiles([r.end - r.start for r in done if r.end is not None]),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown section for BENCHMARKS.md."""
    config, summary = report["config"], report["summary"]

    def ms(metric: str, stat: str) -> str:
        value = summary[metric][stat]
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"### Serving load: {config['rate']} req/s Poisson, {summary['num_requests']} requests",
        "",
        f"Model `{report['model']}` at {config['url']}; {report['date']}; {report['host']}.",
        f"Command: `{report['command']}`",
        "",
        "| completed | errors | req/s | output tok/s | total tok/s |",
        "|---:|---:|---:|---:|---:|",
        (
            f"| {summary['num_completed']}/{summary['num_requests']} | {sum(summary['errors'].values())} "
            f"| {summary['request_throughput_per_s']:.2f} | {summary['output_token_throughput_per_s']:.1f} "
            f"| {summary['total_token_throughput_per_s']:.1f} |"
        ),
        "",
        "| latency (ms) | mean | p50 | p99 |",
        "|---|---:|---:|---:|",
    ]
    for metric, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_latency_ms", "end to end")):
        lines.append(f"| {name} | {ms(metric, 'mean')} | {ms(metric, 'p50')} | {ms(metric, 'p99')} |")
    if summary["errors"]:
        lines += ["", "Errors: " + ", ".join(f"{kind} x{count}" for kind, count in summary["errors"].items())]
    return "\n".join(lines) + "\n"


def check_loopback(url: str) -> None:
    """Refuse any target but this machine: a load test must not leave it."""
    host = urlsplit(url).hostname or ""
    try:
        is_loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise SystemExit(f"--url {url}: only a server on this machine (127.0.0.1, localhost, ::1) is a target")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS, help="WikiText-2 raw text file")
    parser.add_argument("--max-prompt-words", type=int, default=128)
    parser.add_argument("--min-output-tokens", type=int, default=4)
    parser.add_argument("--max-output-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the report as Markdown here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_loopback(args.url)
    if args.rate <= 0 or args.num_requests < 1:
        raise SystemExit("--rate must be > 0 and --num-requests >= 1")
    specs = wikitext_requests(args.data, args.num_requests, args.seed, args)
    results, duration_s, model = asyncio.run(run(args, specs))
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({platform.machine()}, {platform.system()})",
        "command": shlex.join(["python", "benchmarks/serve_load.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model,
        "config": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if key != "api_key"
        },
        "summary": summarize(results, duration_s),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
