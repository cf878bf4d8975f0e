"""replication: log shipping and K2-VCR visibility control (work of the replication issue).

Will hold the per-shard ordered log of committed writes and transaction outcomes streamed to an
asynchronous replica in every other region, replica apply and catch-up (log or snapshot), K2-VCR
epochs and seals with a visibility gate for replica reads, the closed-timestamp baseline, and
later the in-region Raft group, all as step functions from messages to messages and writes (like
etcd's raft) so the deterministic simulator binds the same code.
"""
