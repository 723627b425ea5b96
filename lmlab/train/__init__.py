"""The one training loop, its optimizer, schedule, checkpoints and run configuration."""
