"""Analysis of early exits: per-layer next-token accuracy, perplexity and agreement with the last layer."""
from .per_layer import LayerMetrics, format_table, per_layer_metrics, plot_metrics

__all__ = ["LayerMetrics", "per_layer_metrics", "format_table", "plot_metrics"]
