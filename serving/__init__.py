"""gRPC serving of built indexes and encoders. Lands with issue 7."""
