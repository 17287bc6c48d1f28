"""TPU preflight: the real TPU compiler (libtpu) compiles the sharded train step from this CPU box."""

import pytest

pytest.importorskip("libtpu", reason="preflight needs the tpu extra (pip install 'glm_jax[tpu]')")

from glm_jax.cli import preflight  # noqa: E402
from train_fixtures import REPO  # noqa: E402

MAIN_CONFIG = REPO / "experiments/configs/glm_tiny_stdlib.gin"


def test_glm_tiny_compiles_and_fits_a_v5e_slice(capsys):
    code = preflight.main(["--topology=v5e:2x2", f"--gin_file={MAIN_CONFIG}", "--gin.MeshConfig.tensor=2",
                "--gin.train.sharding='fsdp_tp'"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 x TPU v5 lite" in out and "fits" in out


def test_too_large_config_is_rejected(capsys):
    code = preflight.main(["--topology=v5e:2x2", f"--gin_file={MAIN_CONFIG}", "--gin_file=models/glm_10b.gin"])
    assert code == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
