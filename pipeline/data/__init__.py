"""What flows through the graphs, without torch or Ray: row schemas and the error protocol,
listing, keys, manifests, decoding, labeled pairs, metrics, the synthetic set."""
