"""Jobs over the corpus: the synthetic world, ladder training, the demo (later: indexing, simulation, evaluation)."""
