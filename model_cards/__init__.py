"""Model card templates (`<kind>.md`), shipped as package data `hf_medmae.model_cards` and read by `hf_medmae.hub`."""
