"""Data: SentencePiece tokenizer with the GLM specials, the GLM objectives, packing, the batch schema, corpora, the grain pipeline."""
