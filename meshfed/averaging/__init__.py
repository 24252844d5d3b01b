"""Averaging inside groups and across the mesh (butterfly all-reduce; Moshpit groups and
push-sum gossip follow with the training issue)."""
