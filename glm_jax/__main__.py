"""python -m glm_jax COMMAND ... (see glm_jax.cli)."""

import sys

from glm_jax.cli import main

sys.exit(main())
