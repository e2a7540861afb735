"""Model adapters: the SpecModel protocol, Hugging Face models, toy table models."""
