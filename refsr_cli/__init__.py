"""refsr: reference-based image super-resolution (RefVAE) from the command line."""
__version__ = "0.1.0"
