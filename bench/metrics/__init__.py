"""Metrics: pure metric functions, feature networks, scoring, aggregation, the pretrained-network registry."""
