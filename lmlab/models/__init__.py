"""Model families by paradigm (transformer/, ngram/, word2vec/, eliza/, nplm.py); `registry` maps names to
configs, classes and presets. Models are pure: no generation, training, evaluation, I/O or data pipelines."""
