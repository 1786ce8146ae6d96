"""Training code for sambay's built-in demo model (see train/README.md)."""
