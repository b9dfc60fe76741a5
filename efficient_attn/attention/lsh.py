"""Placeholder for the 'lsh' attention; replaced by its implementation."""
