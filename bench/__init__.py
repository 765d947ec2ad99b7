"""nlpserve's benchmarks: `python -m bench ...`.

Every comparison runs its two sides in the same run, alternating, and is reported as a ratio; the absolute
figures are kept with the machine they came from (`bench/results/<date>-<machine>.json`).
"""
