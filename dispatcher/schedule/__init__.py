"""The dispatcher's decisions: which job runs where, sweeps and early stopping, memory estimates."""
