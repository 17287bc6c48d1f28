"""TPU preflight: the real TPU compiler (libtpu) compiles the sharded train step from this CPU box."""

import pytest

pytest.importorskip("libtpu", reason="preflight needs the tpu extra (pip install 'glm_jax[tpu]')")

import gin  # noqa: E402

from glm_jax import preflight  # noqa: E402


def run(argv):
    try:
        return preflight.main(argv)
    finally:
        gin.clear_config()


def test_glm_tiny_compiles_and_fits_a_v5e_slice(capsys):
    code = run(["--topology=v5e:2x2", "--gin_file=glm_tiny_stdlib.gin", "--gin.MeshConfig.tensor=2",
                "--gin.train.sharding='fsdp_tp'"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 x TPU v5 lite" in out and "fits" in out


def test_too_large_config_is_rejected(capsys):
    code = run(["--topology=v5e:2x2", "--gin_file=glm_tiny_stdlib.gin", "--gin_file=models/glm_10b.gin"])
    assert code == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
