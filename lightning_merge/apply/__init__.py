"""lightning_merge.apply"""
