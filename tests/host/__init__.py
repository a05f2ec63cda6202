"""Tests against a real ComfyUI host (skipped when none is found; see conftest.py)."""
