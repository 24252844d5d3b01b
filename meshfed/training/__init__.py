"""Decentralized federated training: models by name, local training, data partitions,
strategies, and the per-peer job runner that averages in secure groups."""
