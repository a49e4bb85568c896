"""Write every small test model (random weights, real architectures) into a folder.

    python scripts/make_test_models.py OUTDIR [--quants f16,q8_0,q4_k]

Files already there are kept. Prints the path of each model, one a line.
"""

from __future__ import annotations

import argparse
import logging

from moelocal import testmodels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--quants", default=",".join(testmodels.DEFAULT_QUANTS),
                        help="comma-separated: f16, f32, " + ", ".join(testmodels.QUANT_FTYPES))
    args = parser.parse_args()
    # llama-cpp-python prints llama.cpp's whole log unless its logger says otherwise
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    for path in testmodels.build_all(args.outdir, quants=[q for q in args.quants.split(",") if q]).values():
        print(path)


if __name__ == "__main__":
    main()
