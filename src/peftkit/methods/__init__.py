"""One module per PEFT method; each imports only torch and ``peftkit.config``."""
