"""lightning_merge.models"""
