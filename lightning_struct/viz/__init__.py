"""Plots (matplotlib, Agg backend) and W&B payload builders."""
