"""Generated gRPC stubs for kvpool.v1 (see tools/gen_proto.py)."""
