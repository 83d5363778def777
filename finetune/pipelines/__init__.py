"""Pipelines transformers 5 no longer ships; each file here is copied into the exported model directory."""
