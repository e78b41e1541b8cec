"""TokenFlow retraining pipeline."""
