"""gRPC serving of built indexes, encoders and the ranker: service, batching, metrics, hot swap, broker, client."""
