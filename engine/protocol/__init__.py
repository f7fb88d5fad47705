"""The Kafka wire protocol: framing, the API versions we serve, kio glue."""
