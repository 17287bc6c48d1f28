"""The XLA flags of the test run (no imports: conftest.py reads them before jax is imported).

XLA:CPU compiling hundreds of tiny programs is most of the test run's time: LLVM's optimisation
passes cost about a third of it (tests/test_rope.py: 113 s -> 74 s without them) and change no result
the tests check, which compare against references at float32 tolerances or one run against another.
They do change float rounding, so a run whose learned quality is the point (the slow tool-learning
tests) trains without them, as a user's run does (train_fixtures.subprocess_env(fast_compile=False)).
"""

FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
