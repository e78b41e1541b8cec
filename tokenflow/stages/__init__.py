"""Stage implementations: each runs one step of the pipeline on a Ray cluster."""
