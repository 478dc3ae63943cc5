"""A stand-in for a Lightning user's own project (not part of lightning_merge): its model and its data."""
