"""Training: phantoms, (later) PACS pull, the CycleGAN trainer, evaluation and figures.

Writes files (run folders with a model file, its card and logs); owns no database.
"""
