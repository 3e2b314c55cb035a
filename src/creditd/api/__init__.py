"""The gRPC layer: servicers, authentication, conversions and the error model."""
