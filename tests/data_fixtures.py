"""A small generated corpus and a tokenizer trained on it (shared by the data tests)."""

import functools

import numpy as np

from glm_jax.data.tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega def return class import for while if else").split()


def generated_documents(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + str(rng.choice([".", "?", "!", ":\n"]))
                     for _ in range(rng.integers(2, 40))]
        docs.append(" ".join(sentences))
    return docs


@functools.lru_cache(maxsize=None)
def small_tokenizer():
    return train_tokenizer(generated_documents(300), vocab_size=400)


def write_text_corpus(directory, count=120, seed=0):
    """Documents separated by blank lines across 3 files; returns the source string."""
    docs = generated_documents(count, seed)
    for i in range(3):
        (directory / f"part{i}.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs[i::3]))
    return f"text:{directory}/*.txt"
