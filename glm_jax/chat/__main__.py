"""python -m glm_jax.chat --run_dir RUN: the same program as `python -m glm_jax chat`."""

import sys

from glm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
