"""lightning_merge.stats"""
