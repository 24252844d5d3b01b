"""Secure aggregation: pairwise-masked, dropout-tolerant group sums (Bonawitz et al. 2017,
SecAgg+ Bell et al. 2020). This package holds the pure maths; the protocol core and its trio
driver follow."""
