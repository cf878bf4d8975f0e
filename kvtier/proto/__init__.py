"""Generated gRPC stubs of the block store service (from blockstore.proto by scripts/gen_proto.py)."""
