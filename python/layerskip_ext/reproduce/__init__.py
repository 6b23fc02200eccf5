"""layerskip reproduce: train a LayerSkip model and its control from scratch on the standard library, measure both."""
