"""Kafka v2 record batches: layout, building, parsing and compression."""
