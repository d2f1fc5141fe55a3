"""A bundle's signatures as pure JAX functions (what ``export/`` traces): the monolithic
program and the sharded per-block program."""
