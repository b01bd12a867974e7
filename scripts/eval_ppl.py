"""Perplexity evaluation: the same as `kvquant eval-ppl` (see `python scripts/eval_ppl.py -h`)."""
import sys

from kvquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-ppl", *sys.argv[1:]]))
