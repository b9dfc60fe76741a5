"""Placeholder for the 'longformer' attention; replaced by its implementation."""
