"""``neuron-llm bench`` with ``step_profile.py``'s format suffixes applied to the cuda backend,
to A/B the engine's own figures (async scheduling included, as the issue's targets are measured).

    python benchmarks/bench_variant.py -skip-norms-skip-rope-skip-attention --cases decode,int8
    python benchmarks/bench_variant.py -swiglu-in-down --cases decode,int8

The first argument is one or more suffixes of ``step_profile.VARIANTS``, the rest ``neuron-llm
bench``'s arguments; the suffixes hold for every case the bench runs. With ``-skip-*`` the
tokens are wrong by design: the figures time the engine without those kernels, what fusing
them away could save at most. Needs a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import VARIANTS, applied, parse_format  # noqa: E402

from neuron_llm import cli  # noqa: E402


def main(argv: Sequence[str]) -> int:
    if not argv or not argv[0].startswith("-"):
        raise SystemExit(f"usage: bench_variant.py SUFFIXES [bench arguments]; suffixes among {', '.join(VARIANTS)}")
    rest, variants = parse_format(argv[0])
    if rest:
        raise SystemExit(f"bench_variant.py: {rest!r} is not among the suffixes {', '.join(VARIANTS)}")
    print(f"== cuda backend with {''.join(variants)}", flush=True)
    with applied(variants):
        return cli.main(["bench", *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
