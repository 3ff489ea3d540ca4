"""Influence-guided label review for annotation projects (used by the MONAI Label app)."""
