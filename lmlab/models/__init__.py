"""Model families; `registry` maps names to configs, classes and presets."""
