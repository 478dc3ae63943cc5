"""lightning_merge.graph"""
