"""refsr: reference-based image super-resolution (RefVAE) from the command line."""
