"""Placeholder for the 'performer' attention; replaced by its implementation."""
