"""analysis: what we measure inside CLIP (recorder, token statistics, CKA, figures).

Builds on :mod:`cdfsl_core`; ``cdfsl_core`` never imports this package.
"""
