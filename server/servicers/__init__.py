"""The gRPC fronts of the core: inference.py (nlpserve.v1); status.py maps core errors to status codes."""
