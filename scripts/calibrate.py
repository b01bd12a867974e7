"""Calibration run: the same as `kvquant calibrate` (see `python scripts/calibrate.py -h`)."""
import sys

from kvquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
