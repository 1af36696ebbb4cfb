"""`python -m program.rotten_tomatoes OUT_DIR`: the command line of data/rotten_tomatoes.py, which
writes real movie-review snippets as a GLUE SST-2 folder (`make rotten-tomatoes`)."""

import sys

from data import DataError
from data import rotten_tomatoes as rt

from .flags import Parser


def main(argv=None):
    p = Parser(prog="python -m program.rotten_tomatoes", description=rt.__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder to create (must not exist)")
    p.add_argument(
        "--source",
        help=f"the CSV.bz2 (default: {'/'.join(rt.SOURCE)} of the installed {rt.PACKAGE})",
    )
    p.add_argument(
        "--dev_size", type=int, default=rt.DEV_SIZE, help=f"rows of dev.tsv (default {rt.DEV_SIZE})"
    )
    p.add_argument("--seed", type=int, default=rt.SEED, help=f"split seed (default {rt.SEED})")
    args = p.parse_args(argv)
    try:
        print(rt.write(args.out_dir, args.source, args.dev_size, args.seed), end="")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: cannot write: {e.strerror} ({e.filename or args.out_dir})", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
