"""The feature path: cached features, classic classifiers and small heads, export."""
