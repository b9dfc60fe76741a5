"""Placeholder for the 'linformer' attention; replaced by its implementation."""
