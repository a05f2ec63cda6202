"""Quality benchmark (issue #7): does TLoRA (or SODA) adapt better than LoRA? Reproduced at small
scale on real data with the pack's own training code. Run ``python bench/quality/run.py``;
results in ``bench/quality/RESULTS.md``."""
