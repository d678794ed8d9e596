"""The teacher: loading and fingerprinting it, its MLM head, and its signals (top-k, log-sum-exp, hidden states) for the store."""
