"""lightning_merge.callbacks"""
