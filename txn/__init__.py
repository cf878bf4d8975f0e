"""txn: transaction protocols, as I/O-free cores (work of the transaction issue).

Will hold K2-MVTO (timestamp-ordered transactions: one timestamp per transaction from the region's
K2-TB batch, read marks, early writes as intents, lower-timestamp waits, the transaction record on
the home shard, asynchronous intent resolution, future timestamps with aligned dispatch), the
d2PL-TTC and MVTO-HLC baselines in the same code, transaction records, and the typed abort errors
that name the rule, key and timestamp. Talks to the world only through a clock, a transport and a
versioned store (see DESIGN.md section 2). Today the single-key rules live in k2store/shard.py.
"""
