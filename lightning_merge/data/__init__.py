"""lightning_merge.data"""
